"""hb_utils.train.training: completion-only labels on real batches, learning, resume after a kill, guards.

Model tests use the packaged SmolLM2-135M-Instruct (offline) on tiny synthetic data (never MedQuAD
text) with short sequences and a few optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hb_utils import plots, run_dir
from hb_utils.config import load_config
from hb_utils.errors import ConfigError, DataError, RunError
from hb_utils.model import loading
from hb_utils.model.lora_dropout import lora_dropouts
from hb_utils.run_dir import RunPaths, read_json, write_json
from hb_utils.train import callbacks, training, trl_setup
from hb_utils.train.sft_trainer import SupervisedLogitsSFTTrainer
from tests.conftest import ROOT

ORGANS = ["heart", "lung", "skin", "liver", "kidney", "bone"]
EOT = "<|im_end|>"  # SmolLM2's end-of-turn token (ChatML)


def write_qa(path: Path, n: int) -> Path:
    """n short synthetic question/answer pairs as a .jsonl data file."""
    rows = [{"question": f"What is condition number {i} and where does it occur?",
             "answer": f"Condition {i} is a made-up disorder of the {ORGANS[i % len(ORGANS)]}. Rest usually helps."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_cfg(tmp_path: Path, n: int = 12, **overrides):
    """params/smoke.yaml with synthetic data, a tmp output root and tiny sizes."""
    values = dict(dataset=str(write_qa(tmp_path / "qa.jsonl", n)), output_root=str(tmp_path / "out"),
                  sample_size=n, split_by="row", max_length=128, batch_size=2, eval_batch_size=4, grad_accum=1,
                  max_steps=2, logging_steps=1, eval_steps=2, save_steps=2)
    values.update(overrides)
    return load_config(ROOT / "params" / "smoke.yaml", **values)


# --------------------------------------------------------------------------- fast: data, config, helpers
def record(q: str, a: str) -> dict:
    return {"id": q, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]}


def test_to_prompt_completion_is_conversational_prompt_completion():
    ds = trl_setup.to_prompt_completion([record("Q1?", "A1."), record("Q2?", "A2.")])
    assert ds.column_names == ["prompt", "completion"]
    assert [m["role"] for m in ds[0]["prompt"]] == ["system", "user"]
    assert ds[0]["completion"] == [{"role": "assistant", "content": "A1."}]


def test_to_prompt_completion_rejects_records_without_answer():
    bad = record("Q?", "A.")
    bad["messages"] = bad["messages"][:2]
    with pytest.raises(DataError, match="assistant"):
        trl_setup.to_prompt_completion([bad])
    with pytest.raises(DataError, match="empty"):
        trl_setup.to_prompt_completion([])


def test_build_sft_config_takes_every_training_argument_from_cfg(tmp_path):
    cfg = small_cfg(tmp_path, learning_rate=3e-4, batch_size=3, eval_batch_size=5, grad_accum=2, num_epochs=2.0,
                    max_steps=7, lr_scheduler="linear", warmup_ratio=0.1, weight_decay=0.01, optim="adamw_torch",
                    max_grad_norm=0.5, gradient_checkpointing=False, group_by_length=True, logging_steps=3,
                    eval_steps=4, save_steps=8, load_best_model=True, seed=7, max_length=99,
                    completion_only_loss=False)
    args = trl_setup.build_sft_config(cfg, compute_dtype=torch.float32)
    assert Path(args.output_dir) == RunPaths.for_config(cfg).checkpoints
    assert (args.learning_rate, args.per_device_train_batch_size, args.per_device_eval_batch_size) == (3e-4, 3, 5)
    assert (args.gradient_accumulation_steps, args.num_train_epochs, args.max_steps) == (2, 2.0, 7)
    assert args.lr_scheduler_type == "linear" and args.warmup_steps == 0.1
    assert (args.weight_decay, args.optim, args.max_grad_norm) == (0.01, "adamw_torch", 0.5)
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    assert args.train_sampling_strategy == "group_by_length"
    assert (args.logging_steps, args.eval_steps, args.save_steps) == (3, 4, 8)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert (args.seed, args.max_length, args.completion_only_loss) == (7, 99, False)
    assert not args.bf16 and not args.fp16 and not args.packing and not args.assistant_only_loss
    assert args.include_num_input_tokens_seen == "non_padding" and args.logging_nan_inf_filter is False
    bf = trl_setup.build_sft_config(cfg.replace(gradient_checkpointing=True), compute_dtype=torch.bfloat16)
    assert bf.bf16 and not bf.fp16 and bf.activation_checkpointing
    no_eval = trl_setup.build_sft_config(cfg, has_eval=False, compute_dtype=torch.float32)
    assert no_eval.eval_strategy == "no" and not no_eval.load_best_model_at_end


def test_report_to_tensorboard_needs_the_package(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    assert trl_setup.build_sft_config(cfg, compute_dtype=torch.float32).report_to == []
    monkeypatch.setattr(trl_setup, "is_tensorboard_available", lambda: True)  # installed
    args = trl_setup.build_sft_config(cfg.replace(report_to="tensorboard"), compute_dtype=torch.float32)
    assert args.report_to == ["tensorboard"]
    monkeypatch.setattr(trl_setup, "is_tensorboard_available", lambda: False)  # not installed
    with pytest.raises(ConfigError, match="pip install tensorboard.*report_to: none"):
        trl_setup.build_sft_config(cfg.replace(report_to="tensorboard"), compute_dtype=torch.float32)


def test_build_sft_config_needs_save_steps_multiple_of_eval_steps(tmp_path):
    with pytest.raises(ConfigError, match="multiple of eval_steps"):
        trl_setup.build_sft_config(small_cfg(tmp_path, eval_steps=3, save_steps=4), compute_dtype=torch.float32)


class StubTokenizer:
    vocab = {1: "<s>", 2: "Q", 3: "?", 4: "A", 5: "nswer", 6: "</s>", 0: "<pad>"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[int(i)] for i in ids)


def test_mark_supervised_brackets_exactly_the_labelled_span():
    ids = [1, 2, 3, 4, 5, 6, 0, 0]
    labels = [-100, -100, -100, 4, 5, 6, -100, -100]
    mask = [1, 1, 1, 1, 1, 1, 0, 0]
    assert trl_setup.mark_supervised(StubTokenizer(), ids, labels, mask) == "<s>Q?⟦Answer</s>⟧"
    assert trl_setup.supervised_text(StubTokenizer(), torch.tensor(ids), torch.tensor(labels)) == "Answer</s>"
    assert trl_setup.mark_supervised(StubTokenizer(), ids[:6], [-100] * 6) == "<s>Q?Answer</s>"


def test_nan_guard_stops_on_nan_or_inf():
    class Args:
        learning_rate, max_grad_norm = 1e-3, 0.3

    class State:
        global_step = 5

    guard = callbacks.NanGuardCallback()
    guard.on_log(Args(), State(), None, logs={"loss": 1.5, "grad_norm": 0.2})
    for key, value in [("loss", float("nan")), ("eval_loss", float("inf")), ("grad_norm", float("nan"))]:
        with pytest.raises(RunError, match=f"{key} = .*step 5.*learning_rate"):
            guard.on_log(Args(), State(), None, logs={key: value})


def test_oom_guard_names_the_parameters_to_lower(tmp_path):
    cfg = small_cfg(tmp_path, gradient_checkpointing=False)
    for exc in (torch.OutOfMemoryError("CUDA out of memory"), MemoryError(),
                RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")):
        with pytest.raises(RunError) as info, callbacks.oom_guard(cfg):
            raise exc
        msg = str(info.value)
        assert "batch_size" in msg and "max_length" in msg and "gradient_checkpointing=True" in msg
    with pytest.raises(RuntimeError, match="shape mismatch"), callbacks.oom_guard(cfg):
        raise RuntimeError("shape mismatch")


def test_adapter_of_another_config_is_never_overwritten(tmp_path):
    cfg = small_cfg(tmp_path)
    other = cfg.replace(lora_r=16)
    adapter = RunPaths.for_config(cfg).adapter
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    loading.write_adapter_meta(other, adapter)
    with pytest.raises(RunError) as info:
        training.train(cfg)  # refused before any model is loaded
    msg = str(info.value)
    assert "lora_r: 16 -> 8" in msg  # names the parameter that differs, old -> this config
    assert "experiment" in msg and "delete" in msg
    assert read_json(adapter / "hb_meta.json")["stamp"]["fingerprints"]["train"] == other.fingerprint("train")
    assert training.check_adapter_slot(cfg.replace(overwrite=True)) == "replace"
    assert training.check_adapter_slot(other) == "same"
    (adapter / "hb_meta.json").unlink()  # an adapter of unknown origin is refused too
    with pytest.raises(RunError, match="carries no stamp"):
        training.check_adapter_slot(cfg)


def test_reload_check_without_validation_questions_says_what_to_change(tmp_path, monkeypatch):
    monkeypatch.setattr(training.medquad, "ensure_splits", lambda cfg: {"train": [record("q", "a")], "val": []})
    monkeypatch.setattr(loading, "load_adapter_model", lambda *a, **k: pytest.fail("nothing to answer"))
    with pytest.raises(DataError, match="validation split is empty.*sample_size or val_frac"):
        training.reload_check(small_cfg(tmp_path))


def test_resume_picks_this_configs_newest_complete_checkpoint(tmp_path):
    cfg = small_cfg(tmp_path)
    ckpts = RunPaths.for_config(cfg).checkpoints
    assert training.resolve_resume(cfg) is None
    for step, complete in [(2, True), (10, True), (12, False)]:
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            write_json(ckpts / f"checkpoint-{step}" / "trainer_state.json", {"global_step": step})
    write_json(ckpts / training.CHECKPOINT_META, {"stamp": run_dir.stamp(cfg, "train", "test")})
    assert training.resolve_resume(cfg) == str(ckpts / "checkpoint-10")  # 12 was cut off mid-save
    other = cfg.replace(learning_rate=1e-3)
    with pytest.raises(RunError, match=r"checkpoints.*another train config \(learning_rate: 0\.0002 -> 0\.001\)"):
        training.resolve_resume(other)
    assert training.resolve_resume(cfg.replace(resume="never")) is None
    assert not ckpts.exists()


def test_plot_loss_curve_saves_png(tmp_path):
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    fig = plots.loss_curve(history, tmp_path / "plots" / "loss.png")
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    assert [line.get_label() for line in fig.axes[0].lines] == ["train loss", "validation loss"]


def test_compact_log_prints_one_line_per_event(capsys):
    class State:
        global_step, max_steps = 3, 10

    cb = callbacks.CompactLogCallback()
    cb.on_log(None, State(), None, logs={"loss": 1.23456, "learning_rate": 2e-4})
    cb.on_log(None, State(), None, logs={"eval_loss": 1.5})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[train] step 3/10 | loss 1.2346 | lr 2.00e-04")
    assert out[1] == "[eval]  step 3/10 | val loss 1.5000"


def _tiny_trainer(tmp_path):
    """SupervisedLogitsSFTTrainer on a randomly initialised 2-layer Llama and a 20-word tokenizer: the
    real TRL code path in a second, without loading SmolLM2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = "<pad> <eos> <unk> system user assistant : what is condition a b c rest helps the heart".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1))
    with torch.no_grad():  # predict "rest" where h . w > 0, else "<pad>": some supervised tokens right, some wrong
        model.lm_head.weight.zero_()
        model.lm_head.weight[vocab.index("rest")] = torch.randn(32)
    records = [record(f"what is condition {c}", "rest rest rest helps the heart" if i % 2 else "rest helps")
               for i, c in enumerate("abcabc")]
    cfg = small_cfg(tmp_path, compute_dtype="fp32", gradient_checkpointing=False, optim="adamw_torch")
    args = trl_setup.build_sft_config(cfg, output_dir=tmp_path / "ck", has_eval=False, compute_dtype=torch.float32)
    trainer = SupervisedLogitsSFTTrainer(model=model, args=args, processing_class=tok,
                                                  train_dataset=trl_setup.to_prompt_completion(records))
    return trainer, next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("bf16", [False, True])
def test_adapter_weights_stay_fp32_unless_the_run_computes_in_bf16(bf16):
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    model[0].requires_grad_(False)  # a frozen base weight keeps its dtype
    changed = trl_setup.keep_adapter_in_compute_precision(model, SimpleNamespace(bf16=bf16))
    assert changed == (0 if bf16 else 2)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_supervised_logits_trainer_logs_token_accuracy_and_tokens_like_trl(tmp_path):
    from trl import SFTTrainer

    trainer, batch = _tiny_trainer(tmp_path)
    model = trainer.model.train()
    tokens = int(batch["attention_mask"].sum())
    with torch.no_grad():  # the accuracy, computed here from the full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        accuracy = float((logits.argmax(-1) == target)[target != -100].float().mean())
    assert 0 < accuracy < 1
    SFTTrainer.compute_loss(trainer, model, dict(batch))  # what TRL itself logs for this batch
    trls = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    trainer.compute_loss(model, dict(batch))
    ours = trainer._metrics["train"]
    assert trls["mean_token_accuracy"] == pytest.approx([accuracy]) == ours["mean_token_accuracy"]
    assert trls["num_tokens"] == [tokens] and ours["num_tokens"] == [2 * tokens]  # a running total, as in TRL
    model.eval()  # evaluation logs the accuracy and leaves the training token count alone
    trainer.compute_loss(model, dict(batch))
    assert trainer._metrics["eval"]["mean_token_accuracy"] == pytest.approx([accuracy])
    assert trainer._metrics["eval"]["num_tokens"] == [2 * tokens]
    model.train()
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["mean_token_accuracy"] == pytest.approx(accuracy) and logs["num_tokens"] == 2 * tokens


# --------------------------------------------------------------------------- slow: the real model
@pytest.fixture(autouse=True)
def one_thread(request):
    """Model tests run torch on one thread: on a small shared CPU (2 cores, other jobs running), two OpenMP
    threads spin-wait on each other and a training step takes ~10x longer than with one."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_real_batch_supervises_exactly_the_answer_and_end_of_turn(tmp_path):
    cfg = small_cfg(tmp_path, n=8)
    run = training.prepare(cfg)
    tok = run.tokenizer
    assert tok.eos_token == EOT and tok.pad_token_id != tok.eos_token_id
    train = run.splits["train"]
    batch = next(iter(run.trainer.get_train_dataloader()))  # collated by the trainer's own collator
    assert batch["input_ids"].shape[0] == cfg.batch_size
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n_real = int(mask.sum())
        rec = next(r for r in train if r["question"] in tok.decode(ids[:n_real]))
        # exactly the answer, its end-of-turn token and the newline ChatML puts after it
        assert trl_setup.supervised_text(tok, ids, labels) == rec["answer"] + EOT + "\n"
        supervised = (labels != -100).nonzero().flatten().tolist()
        first = supervised[0]
        assert supervised == list(range(first, n_real))  # one block, up to the last real token; no padding
        prompt = tok.apply_chat_template(rec["messages"][:2], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids[:first]) == prompt  # every prompt token (system, question, header) is masked
        assert ids[n_real - 2] == tok.eos_token_id  # <|im_end|> is a real, supervised label
    view = training.example_view(run, 0)
    assert view.startswith("<|im_start|>system\n") and view.endswith(EOT + "\n⟧")
    assert view.count("⟦") == 1 and "assistant\n⟦" in view

    # TRL casts QLoRA adapters to bf16; with fp32 compute they must stay fp32 (bf16 matmuls are emulated on
    # AVX2-only CPUs: half of a step there)
    trainable = {p.dtype for p in run.trainer.model.parameters() if p.requires_grad}
    assert trainable == ({torch.bfloat16} if run.compute_dtype == torch.bfloat16 else {torch.float32})

    # LoRA dropout: hb_utils.model.lora_dropout's masks by default, PEFT's nn.Dropout on request
    assert {type(d).__name__ for d in lora_dropouts(run.trainer.model)} == {"FastDropout"}

    # the original behaviour stays reachable: loss on the whole text
    full = training.prepare(cfg.replace(completion_only_loss=False, fast_lora_dropout=False))
    assert {type(d).__name__ for d in lora_dropouts(full.trainer.model)} == {"Dropout"}
    ex = full.trainer.data_collator([full.trainer.train_dataset[0]])
    text = trl_setup.supervised_text(tok, ex["input_ids"][0], ex["labels"][0])
    assert text.startswith("<|im_start|>system\n") and text.endswith(EOT + "\n")
    assert text == tok.decode(ex["input_ids"][0])


@pytest.mark.slow
def test_training_lowers_the_loss_and_changes_the_output(tmp_path):
    cfg = small_cfg(tmp_path, n=8, learning_rate=2e-3, lr_scheduler="constant", warmup_ratio=0.0, batch_size=3,
                    max_steps=6, eval_steps=6, save_steps=6, gradient_checkpointing=False, lora_dropout=0.0)
    run = training.prepare(cfg)
    metrics = training.fit(run)
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    model = run.trainer.model.eval()
    batch = run.trainer.data_collator([run.trainer.eval_dataset[0]])
    with torch.no_grad():
        tuned = model(input_ids=batch["input_ids"]).logits
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"]).logits
    assert (tuned - base).abs().max() > 1.0
    assert math.isfinite(metrics["final_val_loss"])


@pytest.mark.slow
def test_train_writes_adapter_metrics_plot_and_the_adapter_reloads(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    metrics = training.train(cfg)
    run = RunPaths.for_config(cfg)
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "hb_meta.json"):
        assert (run.adapter / f).is_file(), f
    assert read_json(run.adapter / "hb_meta.json")["stamp"]["fingerprints"]["train"] == cfg.fingerprint("train")
    assert read_json(run.checkpoints / training.CHECKPOINT_META)["stamp"]["fingerprints"]["train"] == \
        cfg.fingerprint("train")
    saved = read_json(run.metrics / "train.json")
    assert saved["global_step"] == 2 and saved["n_train_truncated"] == 0
    assert math.isfinite(saved["best_val_loss"]) and math.isfinite(saved["final_train_loss"])
    assert saved["tokens_per_second"] > 0 and saved["peak_memory"]["gb"] > 0
    assert 0 < saved["parameters"]["trainable"] < saved["parameters"]["total"]
    assert saved["stamp"]["fingerprints"] == {s: cfg.fingerprint(s) for s in ("data", "train")}
    assert saved["device"]["versions"]["trl"]
    assert [h["step"] for h in read_json(run.metrics / "log_history.json") if "loss" in h] == [1, 2]
    assert run.plot("loss_curve").stat().st_size > 1000
    assert not run.adapter.with_name("adapter.partial").exists()

    # what 03's last cell shows: the adapter, reloaded from disk, answers validation questions
    [row] = training.reload_check(cfg.replace(eval_max_new_tokens=6), n_questions=1)
    val_question = training.medquad.ensure_splits(cfg)["val"][0]["question"]
    assert row["question"] == val_question and 0 < row["new_tokens"] <= 6 and row["answer"].strip()

    # rerunning the stage with the same config reuses the adapter instead of training again
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: pytest.fail("model loaded again"))
    assert training.train(cfg) == metrics


CHILD = textwrap.dedent("""\
    import json, sys, time
    from transformers import TrainerCallback
    from hb_utils.train import training
    from hb_utils.config import ExperimentConfig

    class HangAfterSave(TrainerCallback):  # the parent kills us while we wait here
        def on_save(self, args, state, control, **kwargs):
            print("saved", state.global_step, flush=True)
            time.sleep(600)

    training.train(ExperimentConfig(**json.loads(sys.argv[1])), callbacks=[HangAfterSave()])
""")


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = small_cfg(tmp_path, max_steps=4, save_steps=2, eval_steps=2, gradient_checkpointing=False)
    run = RunPaths.for_config(cfg)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HB_HEADLESS": "1", "OMP_NUM_THREADS": "1"}  # one thread, as the fixture above
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg.to_dict())], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run.checkpoints / "checkpoint-2" / "trainer_state.json").is_file():
            assert proc.poll() is None, "the training subprocess ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        proc.kill()  # like a kernel killed mid-run
        proc.wait()
    assert not (run.checkpoints / "checkpoint-4").exists() and not run.adapter.exists()

    monkeypatch.setenv("HB_HEADLESS", "1")
    metrics = training.train(cfg)
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2" in out
    logged = [int(s) for s in re.findall(r"\[train\] step (\d+)/4 \|", out)]
    assert logged == [3, 4]  # continued after the checkpoint; steps 1-2 were not trained again
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    assert read_json(run.checkpoints / "checkpoint-4" / "trainer_state.json")["global_step"] == 4
    history = read_json(run.metrics / "log_history.json")
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # the killed run's logs are kept


@pytest.mark.slow
def test_nan_loss_stops_the_run(tmp_path):
    from transformers import TrainerCallback

    class PoisonAdapter(TrainerCallback):
        """Make the LoRA weights NaN after step 1, as a diverged update would."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.data.fill_(float("nan"))

    cfg = small_cfg(tmp_path, max_steps=3, eval_steps=3, save_steps=3, gradient_checkpointing=False)
    with pytest.raises(RunError, match=r"diverged: (loss|grad_norm) = nan at step 2"):
        training.train(cfg, callbacks=[PoisonAdapter()])
    assert not RunPaths.for_config(cfg).adapter.exists()


@pytest.mark.slow
def test_supervised_logits_loss_equals_trls_loss(tmp_path):
    from trl import SFTTrainer

    cfg = small_cfg(tmp_path, n=8, compute_dtype="fp32", lora_dropout=0.0, batch_size=3)
    run = training.prepare(cfg)
    trainer = run.trainer
    assert isinstance(trainer, SupervisedLogitsSFTTrainer)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        for n in (None, n_items, 2 * n_items):
            ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
            trls = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=n)
            assert torch.allclose(ours, trls, rtol=1e-4), (n, float(ours), float(trls))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
