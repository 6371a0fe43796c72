"""One validated experiment config: every parameter once, with its default, type and help.

Why a dataclass and not a dict: papermill passes parameters as loose Python literals, and it only
*warns* about names a notebook does not know; YAML 1.1 reads ``2e-4`` as a string. Both let a
typo or a wrong type through silently. :class:`ExperimentConfig` is the single source of defaults
(= Experiment 1), and :func:`load_config` / :func:`hb_utils.runs.notebook.config_from_namespace` fail early with a
:class:`~hb_utils.errors.ConfigError` that names the parameter and the fix.

Fingerprints (:meth:`ExperimentConfig.fingerprint`) let every artifact record which settings made
it, so a notebook never mixes artifacts from different configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hb_utils.errors import ConfigError
from hb_utils.params_file import read_params_file

SYSTEM_PROMPT = (
    "You are HealthBot, a knowledgeable and empathetic medical information assistant. "
    "You provide accurate, evidence-based health information to help users understand medical "
    "conditions, symptoms, and treatments. Always remind users to consult a qualified healthcare "
    "professional for personal medical advice."
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Every field declares the scope of what it shapes (field metadata "scope"):
#   data  -> the split files (02),  train -> the adapter (03),  eval -> metrics (04/05),
#   run   -> bookkeeping and kernel choices that compute the same thing (only rounding differs).
# Fingerprints are cumulative: "train" covers data + train fields, "eval" covers data + train + eval,
# so changing an evaluation parameter never invalidates a split or an adapter, and a new field cannot be
# forgotten in a hand-kept list (a test checks every field has exactly one scope).
SCOPES = ("data", "train", "eval", "run")
# Bump when the same data parameters produce different split files (the grouping changed), so splits and
# adapters made by the old method are not reused as "the same config". 2: answers and near-duplicate answers
# join groups (hb_utils.data.split).
SPLIT_METHOD_VERSION = 2
FINGERPRINT_SCOPES = {"data": ("data",), "train": ("data", "train"), "eval": ("data", "train", "eval")}


def _f(default: Any, help: str, scope: str, **meta: Any) -> Any:
    """A dataclass field with its one-line help, its scope (see SCOPES) and optional choices / bounds."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")  # a bug in this module
    meta["help"], meta["scope"] = help, scope
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ExperimentConfig:
    """Every parameter of an experiment. Defaults reproduce Experiment 1."""

    # --- run ---
    experiment: str = _f("exp1", "Run name: artifacts go to <output_root>/<experiment>/.", scope="run")
    output_root: str = _f("outputs", "Where run directories live (relative paths: to the repo root).", scope="run")
    overwrite: bool = _f(False, "Replace artifacts of a different config in this run directory.", scope="run")
    # --- data ---
    dataset: str = _f("lavita/MedQuAD", "Hub dataset id, MedQuAD XML release dir, or .parquet/.jsonl/.csv file.",
                      scope="data")
    dataset_split: str = _f("train", "Split of a Hub dataset to load.", scope="data")
    system_prompt: str = _f(SYSTEM_PROMPT, "System message of every chat record.", scope="data")
    strip_html: bool = _f(True, "Strip HTML tags from questions and answers.", scope="data")
    min_question_chars: int = _f(10, "Keep questions longer than this many characters.", min=0, scope="data")
    min_answer_chars: int = _f(20, "Keep answers longer than this many characters.", min=0, scope="data")
    max_answer_words: int = _f(300, "Keep answers of at most this many words.", min=1, scope="data")
    sample_size: int = _f(1500, "Number of pairs sampled after cleaning.", min=1, scope="data")
    sample_seed: int = _f(42, "Seed of the sample.", scope="data")
    train_frac: float = _f(0.8, "Fraction of pairs for training.", min=0.0, max=1.0, scope="data")
    val_frac: float = _f(0.1, "Fraction of pairs for validation.", min=0.0, max=1.0, scope="data")
    test_frac: float = _f(0.1, "Fraction of pairs for testing.", min=0.0, max=1.0, scope="data")
    split_seed: int = _f(42, "Seed of the train/val/test split.", scope="data")
    split_by: str = _f("question", "What never spans two splits: question (+ same or near-duplicate answer), focus, "
                       "or row (the original's).",
                       choices=("row", "question", "focus"), scope="data")
    # data scope, not eval: 02 drops the MedQuAD pairs that leak into these sets, so they shape the split
    external_eval: list[str] = _f([], "External sets (LiveQA XML, MedLFQA JSONL; paths from the repo root): 02 drops "
                                  "pairs leaking into them, 04 scores each.", scope="data")
    # --- model ---
    model_name: str = _f("TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                         "Hub id, local model dir, or the offline alias smollm2-135m-instruct.", scope="train")
    max_length: int = _f(512, "Maximum tokens per training example.", min=16, scope="train")
    load_in_4bit: bool = _f(True, "Quantize the base model to 4-bit (QLoRA).", scope="train")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit quantization type.", choices=("nf4", "fp4"), scope="train")
    bnb_4bit_double_quant: bool = _f(True, "Double quantization of the 4-bit constants.", scope="train")
    compute_dtype: str = _f("auto", "auto (bf16 where supported, else fp16 on GPU / fp32 on CPU), bf16, fp16, fp32.",
                            choices=("auto", "bf16", "fp16", "fp32"), scope="train")
    attn_implementation: str = _f("auto", "Attention kernel: auto (the faster one per device and dtype, "
                                  "hb_utils.model.attention), sdpa or eager.",
                                  choices=("auto", "sdpa", "eager"), scope="run")
    # --- LoRA ---
    lora_r: int = _f(8, "LoRA rank.", min=1, scope="train")
    lora_alpha: int = _f(16, "LoRA alpha; the adapter output is scaled by alpha / r.", min=1, scope="train")
    lora_dropout: float = _f(0.05, "LoRA dropout, in [0, 1).", min=0.0, max_excl=1.0, scope="train")
    fast_lora_dropout: bool = _f(True, "On CPU, draw LoRA dropout masks 16 bits at a time (faster; p rounded to "
                                 "2**-16); False: nn.Dropout.",
                                 scope="train")
    lora_target_modules: list[str] = _f(LORA_TARGETS, "Module names that get LoRA adapters.", scope="train",
                                        comma_list=True)
    # --- training ---
    learning_rate: float = _f(2e-4, "Peak learning rate.", min_excl=0.0, scope="train")
    batch_size: int = _f(2, "Per-device training batch size.", min=1, scope="train")
    eval_batch_size: int = _f(2, "Per-device evaluation batch size.", min=1, scope="train")
    grad_accum: int = _f(4, "Gradient accumulation steps.", min=1, scope="train")
    num_epochs: float = _f(1.0, "Training epochs.", min_excl=0.0, scope="train")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run num_epochs).", min=-1, scope="train")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (transformers name).", scope="train")
    warmup_ratio: float = _f(0.05, "Share of steps for warm-up.", min=0.0, max=1.0, scope="train")
    weight_decay: float = _f(0.001, "Weight decay.", min=0.0, scope="train")
    optim: str = _f("paged_adamw_8bit", "Optimizer (transformers name); paged_adamw_8bit runs unpaged on a CPU.",
        scope="train")
    max_grad_norm: float = _f(0.3, "Gradient clipping norm.", min_excl=0.0, scope="train")
    gradient_checkpointing: bool = _f(True, "Recompute activations to save memory.", scope="train")
    group_by_length: bool = _f(False, "Batch examples of similar length (less padding).", scope="train")
    logging_steps: int = _f(25, "Log training loss every N steps.", min=1, scope="run")
    eval_steps: int = _f(100, "Validate every N steps.", min=1, scope="train")
    save_steps: int = _f(200, "Checkpoint every N steps.", min=1, scope="train")
    load_best_model: bool = _f(True, "Keep the checkpoint with the best validation loss.", scope="train")
    completion_only_loss: bool = _f(True, "Loss on answer tokens only (False: original full-sequence loss).",
                                    scope="train")
    seed: int = _f(42, "Training seed.", scope="train")
    report_to: str = _f("none", "Training logger: none, tensorboard (logs in checkpoints/runs/) or trackio (logs in "
                        "<output_root>/trackio/).",
                        choices=("none", "tensorboard", "trackio"), scope="run")
    num_processes: int = _f(1, "Data-parallel training processes (accelerate; docs/distributed.md); effective batch "
                            "is batch x accum x N.",
                            min=1, scope="train")
    accelerate_config: str = _f("", "accelerate config YAML for num_processes > 1 (e.g. accelerate/fsdp_qlora.yaml); "
                                "empty: DDP defaults.",
                                scope="run")
    resume: str = _f("auto", "auto: continue from this config's newest checkpoint; never: start fresh.",
                     choices=("auto", "never"), scope="run")
    # --- evaluation ---
    eval_size: int | str = _f(20, "Test questions to generate answers for (an int, or 'all').", scope="eval")
    eval_max_new_tokens: int = _f(150, "New-token limit of evaluation answers (greedy).", min=1, scope="eval")
    ppl_size: int | str = _f(50, "Test texts for perplexity (an int, or 'all').", scope="eval")
    gen_batch_size: int = _f(32, "Batch size of evaluation generation (left-padded, greedy).", min=1, scope="eval")
    ppl_batch_size: int = _f(8, "Batch size of the perplexity passes.", min=1, scope="eval")
    bootstrap_samples: int = _f(1000, "Bootstrap resamples for confidence intervals.", min=10, scope="eval")
    # --- external sets and statement judge (docs/evaluation.md) ---
    external_size: int | str = _f(100, "Questions of each external set to answer (an int, or 'all').", scope="eval")
    liveqa_questions: list[str] = _f(["summary", "message"], "LiveQA question text asked, one set each: summary "
                                     "(NLM), paraphrase (NIST), message (the consumer's own).",
                                     choices=("summary", "paraphrase", "message"), scope="eval", comma_list=True)
    judge_model: str = _f("Qwen/Qwen2.5-7B-Instruct", "Model judging the MedLFQA statements (Hub id, local dir or "
                          "smollm2-135m-instruct); empty: none.", scope="eval")
    judge_batch_size: int = _f(16, "Batch size of the judge's calls.", min=1, scope="eval")
    # --- qualitative ---
    prompts: list[str] = _f([], "Extra prompts for 05_qualitative, besides the six standard ones.", scope="eval")
    qual_temperature: float = _f(0.3, "Sampling temperature of qualitative answers.", min_excl=0.0, scope="eval")
    qual_top_p: float = _f(0.9, "Nucleus sampling top_p.", min_excl=0.0, max=1.0, scope="eval")
    qual_repetition_penalty: float = _f(1.15, "Repetition penalty.", min_excl=0.0, scope="eval")
    qual_max_new_tokens: int = _f(256, "New-token limit of qualitative answers.", min=1, scope="eval")
    qual_seed: int = _f(42, "Sampling seed, so a rerun gives the same text.", scope="eval")
    progress: bool = _f(True, "Show progress bars (kept quiet in headless runs).", scope="run")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        total = self.train_frac + self.val_frac + self.test_frac
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"train_frac + val_frac + test_frac must sum to 1, got {total:g} "
                f"({self.train_frac:g} + {self.val_frac:g} + {self.test_frac:g})."
            )
        if self.train_frac <= 0:
            raise ConfigError("train_frac must be > 0: there would be nothing to train on.")
        bad = [c for c in self.experiment if c in '/\\' or not c.isprintable()]
        if not self.experiment.strip() or bad or self.experiment.startswith("."):
            raise ConfigError(f"experiment must be a plain directory name (no /, \\, control characters or leading "
                              f"dot), got {self.experiment!r}. Use e.g. -p experiment lr_test_2.")
        blank = [i for i, p in enumerate(self.prompts) if not p.strip()]
        if blank:
            raise ConfigError(f"prompts holds {len(blank)} empty or blank prompt(s) (positions {blank}): remove them "
                              "or write a question.")

    # --- derived ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, scope: str = "eval") -> str:
        """A short hash of the fields that shape an artifact of ``scope``: ``data`` (the split),
        ``train`` (the adapter: data + train fields) or ``eval`` (the metrics: every result field)."""
        if scope not in FINGERPRINT_SCOPES:
            raise ValueError(f"unknown fingerprint scope {scope!r}; expected one of {', '.join(FINGERPRINT_SCOPES)}")
        names = fields_in(*FINGERPRINT_SCOPES[scope])
        payload = json.dumps({"split_method": SPLIT_METHOD_VERSION, **{n: getattr(self, n) for n in names}},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def fingerprints(self) -> dict[str, str]:
        return {s: self.fingerprint(s) for s in FINGERPRINT_SCOPES}

    def differences(self, other: ExperimentConfig | Mapping[str, Any], scope: str = "eval") -> dict[str, tuple]:
        """``{name: (other's value, this value)}`` for the fields of ``scope``'s fingerprint that differ."""
        theirs = other.to_dict() if isinstance(other, ExperimentConfig) else dict(other)
        return {n: (theirs.get(n), getattr(self, n)) for n in fields_in(*FINGERPRINT_SCOPES[scope])
                if theirs.get(n) != getattr(self, n)}

    def replace(self, **changes: Any) -> ExperimentConfig:
        check_names(changes)
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in fields(ExperimentConfig)}


def fields_in(*scopes: str) -> tuple[str, ...]:
    """The names of the fields whose scope is one of ``scopes``, in declaration order."""
    return tuple(name for name, f in FIELDS.items() if f.metadata["scope"] in scopes)


# The scopes each stage notebook reads. Its parameters cell lists just these fields (under scope headings),
# `hb run` passes it just these, and a notebook given another stage's parameter refuses it, naming the stages
# that read it: `-p lora_r 8` to 01_eda changes nothing there and must not look as if it did.
STAGE_SCOPES = {"01_eda": ("run", "data"), "02_format_split": ("run", "data"),
                "03_train_qlora": ("run", "data", "train"), "04_evaluate": SCOPES, "05_qualitative": SCOPES}


def stage_fields(stage: str | None) -> tuple[str, ...]:
    """The parameters ``stage`` (a notebook name such as ``01_eda``) reads; every field for None."""
    if stage is None:
        return tuple(FIELDS)
    if stage not in STAGE_SCOPES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_SCOPES)}")  # a bug in the caller
    return fields_in(*STAGE_SCOPES[stage])


def stages_using(name: str) -> list[str]:
    """The stage notebooks whose parameters include ``name``."""
    return [stage for stage in STAGE_SCOPES if name in stage_fields(stage)]


def check_names(values: Mapping[str, Any], stage: str | None = None) -> None:
    """ConfigError for a name that is no parameter (with a did-you-mean), or, with ``stage``, for a parameter
    that stage does not read (naming the stages that do)."""
    for name in values:
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown parameter {name!r}.{hint} "
                "See `papermill --help-notebook notebooks/<notebook>.ipynb` or hb_utils/config.py for the list."
            )
    foreign = [name for name in values if name not in stage_fields(stage)]
    if foreign:
        users = {name: ", ".join(stages_using(name)) for name in foreign}
        listed = "; ".join(f"{n} ({FIELDS[n].metadata['scope']} scope) is read by {u}" for n, u in users.items())
        raise ConfigError(f"{stage} does not read {', '.join(foreign)}: {listed}. Pass it to those notebooks, or "
                          f"run the experiment with `hb run`, which gives each notebook its own parameters "
                          f"(`hb run params/<file>.yaml --only {stage[:2]}` runs this one).")


def type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("'", "")


def _parse_number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got the boolean {value!r}.")
    if isinstance(value, str):
        # YAML 1.1 reads 2e-4 (no dot) as a string; papermill's -p may pass "8" as text.
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            kind_text = "a number" if kind is float else "an integer"
            raise ConfigError(f"{name} must be {kind_text}, got {value!r}.") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _parse_list(name: str, value: Any, *, comma_list: bool = False) -> list[str]:
    """A list of strings from a list, a JSON/YAML list literal (``[a, b]``) or, for lists of names
    (``comma_list``: lora_target_modules), ``a,b``. A plain string for a list of free text (``prompts``)
    is ONE item: a question may hold commas, so splitting it would change what the user wrote."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{name}: cannot parse {value!r} as a list; write e.g. "
                                      f"-y '{name}: [a, b]' or -p {name} 'a,b'.") from None
        elif comma_list:
            value = [part.strip() for part in text.split(",") if part.strip()] if text else []
        else:
            value = [value] if text else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}.")
    return list(value)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and bounds; return it in canonical form."""
    name, meta, typ = f.name, f.metadata, type_name(f)
    if typ == "list[str]":
        value = _parse_list(name, value, comma_list=bool(meta.get("comma_list")))
        if name == "lora_target_modules" and not value:
            raise ConfigError("lora_target_modules must name at least one module, e.g. [q_proj, v_proj].")
        if "choices" in meta and (not value or any(v not in meta["choices"] for v in value)):
            raise ConfigError(f"{name} must name one or more of {', '.join(meta['choices'])}; got {value!r}.")
        return value
    if typ == "int | str":  # a count or 'all'
        if isinstance(value, str) and value.strip().lower() == "all":
            return "all"
        value = _parse_number(name, value, int)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1 or 'all', got {value}.")
        return value
    if typ == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}.")
        return value
    if typ in ("int", "float"):
        value = _parse_number(name, value, int if typ == "int" else float)
        bounds = [("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                  ("min_excl", lambda v, b: v > b, ">"), ("max_excl", lambda v, b: v < b, "<")]
        for key, ok, sign in bounds:
            if key in meta and not ok(value, meta[key]):
                raise ConfigError(f"{name} must be {sign} {meta[key]}, got {value}.")
        return value
    if typ == "str":
        if isinstance(value, int) and not isinstance(value, bool):
            # papermill's -p (and hb run's, which parses the same way) reads `-p experiment 2024` as the int
            # 2024; the field's type says text, and an int's digits are exactly what was typed.
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be text, got {value!r} ({type(value).__name__}): YAML or -p read the "
                              f"value as a {type(value).__name__}. Quote it to keep the text: -r {name} VALUE on the "
                              f"command line (hb run and papermill), or {name}: 'VALUE' in YAML.")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}.")
        return value
    raise TypeError(f"config field {name} has unsupported type {typ}")  # a bug in this module


def load_config(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """Build the config from an optional YAML file plus keyword overrides (overrides win)."""
    values = read_params_file(path) if path is not None else {}
    values.update(overrides)
    check_names(values)
    return ExperimentConfig(**values)
