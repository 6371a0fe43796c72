import dataclasses

import pytest

from hb_utils.config import (
    FIELDS,
    LORA_TARGETS,
    SYSTEM_PROMPT,
    ConfigError,
    ExperimentConfig,
    load_config,
)
from hb_utils.runs.notebook import config_from_namespace, parameters_cell_source
from tests.conftest import ROOT


def test_defaults_are_experiment_1():
    c = ExperimentConfig()
    assert c.model_name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and c.dataset == "lavita/MedQuAD"
    assert c.system_prompt == SYSTEM_PROMPT and c.system_prompt.startswith("You are HealthBot")
    assert (c.min_question_chars, c.min_answer_chars, c.max_answer_words) == (10, 20, 300)
    assert (c.sample_size, c.sample_seed, c.split_seed) == (1500, 42, 42)
    assert (c.train_frac, c.val_frac, c.test_frac, c.max_length) == (0.8, 0.1, 0.1, 512)
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_double_quant
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (8, 16, 0.05) and c.lora_target_modules == LORA_TARGETS
    assert (c.learning_rate, c.batch_size, c.eval_batch_size, c.grad_accum, c.num_epochs) == (2e-4, 2, 2, 4, 1.0)
    assert (c.lr_scheduler, c.warmup_ratio, c.weight_decay, c.optim) == ("cosine", 0.05, 0.001, "paged_adamw_8bit")
    assert (c.max_grad_norm, c.gradient_checkpointing) == (0.3, True)
    assert (c.logging_steps, c.eval_steps, c.save_steps, c.load_best_model) == (25, 100, 200, True)
    assert (c.eval_size, c.eval_max_new_tokens, c.ppl_size) == (20, 150, 50)
    assert (c.qual_temperature, c.qual_top_p, c.qual_repetition_penalty, c.qual_max_new_tokens) == (0.3, 0.9, 1.15, 256)


def test_every_field_has_help_and_snake_case_name():
    for f in dataclasses.fields(ExperimentConfig):
        assert f.metadata.get("help"), f.name
        assert f.name == f.name.lower() and " " not in f.name


def test_exp1_yaml_equals_defaults():
    c = load_config(ROOT / "params" / "exp1.yaml")
    assert c.replace(external_eval=[]) == ExperimentConfig()  # the default names no external set
    names = [p.rsplit("/", 1)[-1] for p in c.external_eval]  # Experiment 1 names both sets (docs/evaluation.md)
    assert names[0].startswith("TREC-2017-LiveQA") and names[1:] == ["live_qa_test_MedLFQA.jsonl",
                                                                     "medication_qa_test_MedLFQA.jsonl"]


def test_every_params_file_is_valid():
    files = sorted((ROOT / "params").glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        if path.name.startswith("series_"):  # a sweep spec: every trial's config is built and checked
            from hb_utils.runs import sweep

            sweep.expand(sweep.load_spec(path))
        else:
            load_config(path)  # raises ConfigError on any problem


@pytest.mark.parametrize("value", ["2e-4", "2E-4", 0.0002, "0.0002"])
def test_yaml_1_1_scientific_notation_is_a_number(tmp_path, value):
    p = tmp_path / "x.yaml"
    p.write_text(f"learning_rate: {value}\n")
    c = load_config(p)
    assert isinstance(c.learning_rate, float) and c.learning_rate == pytest.approx(2e-4)


def test_unknown_key_suggests_the_right_name():
    with pytest.raises(ConfigError, match=r"Unknown parameter 'lora_rr'.*Did you mean 'lora_r'"):
        load_config(lora_rr=4)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"lora_r": 0}, r"lora_r must be >= 1"),
        ({"lora_r": "eight"}, r"lora_r must be an integer"),
        ({"lora_r": 2.5}, r"lora_r must be an integer"),
        ({"lora_r": True}, r"lora_r must be a number"),
        ({"learning_rate": 0}, r"learning_rate must be > 0"),
        ({"learning_rate": "fast"}, r"learning_rate must be a number"),
        ({"learning_rate": float("nan")}, r"learning_rate must be a finite number"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be < 1"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be >= 0"),
        ({"train_frac": 0.7}, r"must sum to 1"),
        ({"sample_size": 0}, r"sample_size must be >= 1"),
        ({"split_by": "doc"}, r"split_by must be one of row, question, focus"),
        ({"load_in_4bit": "yes"}, r"load_in_4bit must be true or false"),
        ({"model_name": 7.5}, r"model_name must be text, got 7.5 \(float\).*-r model_name"),
        ({"model_name": None}, r"model_name must be text"),
        ({"eval_size": 0}, r"eval_size must be >= 1 or 'all'"),
        ({"lora_target_modules": []}, r"at least one module"),
        ({"lora_target_modules": [1, 2]}, r"must be a list of strings"),
        ({"experiment": "../x"}, r"plain directory name"),
    ],
)
def test_bad_values_name_the_parameter(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(**overrides)


def test_lists_from_strings_are_parsed():
    assert load_config(lora_target_modules="q_proj, v_proj").lora_target_modules == ["q_proj", "v_proj"]
    assert load_config(lora_target_modules='["q_proj","k_proj"]').lora_target_modules == ["q_proj", "k_proj"]
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(lora_target_modules="[q_proj,")


def test_eval_size_all_and_string_numbers():
    assert load_config(eval_size="all").eval_size == "all"
    assert load_config(eval_size="32").eval_size == 32
    assert load_config(load_in_4bit="False").load_in_4bit is False


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="flat mapping"):
        load_config(bad)


def test_fingerprints_track_the_right_fields():
    base = ExperimentConfig()
    assert base.fingerprint("data") == ExperimentConfig(experiment="other").fingerprint("data")
    assert base.fingerprints() == ExperimentConfig(experiment="other", progress=False).fingerprints()
    lr = base.replace(learning_rate=1e-3)
    assert lr.fingerprint("data") == base.fingerprint("data")
    assert lr.fingerprint("train") != base.fingerprint("train")
    ev = base.replace(eval_size=40)
    assert ev.fingerprint("train") == base.fingerprint("train") and ev.fingerprint("eval") != base.fingerprint("eval")
    assert base.replace(sample_size=10).fingerprint("data") != base.fingerprint("data")
    assert base.differences(lr, "train") == {"learning_rate": (1e-3, 2e-4)}
    assert base.differences(lr, "data") == {}


def test_every_field_has_exactly_one_scope_and_fingerprints_derive_from_it():
    """A new field cannot be left out of the fingerprints: its scope is part of its declaration."""
    from hb_utils.config import FINGERPRINT_SCOPES, SCOPES, fields_in

    for name, f in FIELDS.items():
        assert f.metadata.get("scope") in SCOPES, name
    assert sorted(sum((list(fields_in(s)) for s in SCOPES), [])) == sorted(FIELDS)  # each field in exactly one
    base = ExperimentConfig()
    for name, f in FIELDS.items():
        scope = f.metadata["scope"]
        value = getattr(base, name)
        changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2, str: lambda v: v + "x",
                   list: lambda v: [*v, "x"]}[type(value)](value)
        if name in ("train_frac", "val_frac", "test_frac"):
            other = base.replace(train_frac=0.7, val_frac=0.2) if name != "test_frac" else base.replace(
                train_frac=0.7, test_frac=0.2)
        elif name in ("split_by", "compute_dtype", "bnb_4bit_quant_type", "attn_implementation", "report_to",
                      "resume", "experiment"):
            choices = f.metadata.get("choices", ("other",))
            other = base.replace(**{name: next(c for c in choices if c != value)})
        elif name in ("eval_size", "ppl_size"):
            other = base.replace(**{name: 3})
        elif name == "liveqa_questions":
            other = base.replace(liveqa_questions=["paraphrase"])
        else:
            other = base.replace(**{name: changed})
        moved = {s for s in FINGERPRINT_SCOPES if other.fingerprint(s) != base.fingerprint(s)}
        expected = {"data": {"data", "train", "eval"}, "train": {"train", "eval"}, "eval": {"eval"}, "run": set()}
        assert moved == expected[scope], name


def test_namespace_from_a_notebook_catches_unknown_names():
    ns = {"In": [], "get_ipython": print, "lora_r": 4, "_private": 1, "config_from_namespace": config_from_namespace}
    assert config_from_namespace(ns).lora_r == 4
    with pytest.raises(ConfigError, match="Did you mean 'lora_alpha'"):
        config_from_namespace({**ns, "lora_alpah": 32})


def test_notebook_variables_are_not_parameters_but_injected_typos_are():
    """In a kernel, only the names the parameters cells assigned are candidates (IPython's `In`), so a
    second Run All (globals hold `rows`, `keys` ...) works while papermill's `-p lora_rr 8` still fails."""
    ours = parameters_cell_source()
    ns: dict = {}
    exec(ours, {}, ns)
    ns.update(rows=[1, 2], keys=["a"], In=["", "import x", ours, "cfg = config_from_namespace(globals())"])
    assert config_from_namespace(ns) == ExperimentConfig()  # rows/keys ignored
    injected = "# Parameters\nlora_r = 4\nlora_rr = 8\n"
    ns_pm = {**ns, "lora_r": 4, "lora_rr": 8, "In": ["", ours, injected, "cfg = ..."]}
    with pytest.raises(ConfigError, match="Unknown parameter 'lora_rr'.*Did you mean 'lora_r'"):
        config_from_namespace(ns_pm)
    ok = {**ns, "lora_r": 4, "In": ["", ours, "# Parameters\nlora_r = 4\n", "cfg = ..."]}
    assert config_from_namespace(ok).lora_r == 4
    # Run All twice: the history holds both runs; the newest parameters cell decides.
    again = {**ok, "In": ok["In"] + ["rows = 1", ours, "cfg = ..."], "lora_r": 8}
    assert config_from_namespace(again).lora_r == 8
    # A typo typed into the parameters cell itself is caught too.
    typo = {**ns, "lora_alpah": 3, "In": ["", ours + "\nlora_alpah = 3", "cfg = ..."]}
    with pytest.raises(ConfigError, match="Did you mean 'lora_alpha'"):
        config_from_namespace(typo)


def test_parameters_cell_round_trips():
    ns: dict = {}
    exec(parameters_cell_source(), {}, ns)
    assert {k for k in ns if not k.startswith("_")} == set(FIELDS)
    assert config_from_namespace(ns) == ExperimentConfig()


def test_help_strings_are_short():
    """Help strings are one short line (they fill parameters cells and `--help-notebook`); longer explanations
    belong in the docs."""
    long = {name: len(f.metadata["help"]) for name, f in FIELDS.items() if len(f.metadata["help"]) > 120}
    assert not long, long
