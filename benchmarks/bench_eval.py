"""Evaluation speed: the project's batched generation and perplexity vs the original one-at-a-time loops, and
the throughput of 04 on the external sets (answers/s) and of the statement judge (judgements/s).

    .venv/bin/python benchmarks/bench_eval.py --threads 1        # N=32 questions, params/smoke.yaml
    .venv/bin/python benchmarks/bench_eval.py --n 64 --repeats 3 --parts ppl
    .venv/bin/python benchmarks/bench_eval.py --threads 1 --gen-batch-sizes 8,16 --ppl-batch-sizes 2,4,16  # + sizes
    .venv/bin/python benchmarks/bench_eval.py --parts ext --ext-n 8   # external sets + judge (smoke_external.yaml)

Both methods run in the same process on the same weights (SmolLM2-135M-Instruct of the smoke config),
the same chat-template texts and the same settings, so the ratio is what counts on a shared machine.

Generation: the model is loaded unquantized in fp32 (override with ``-p``), because the check that
both give identical texts needs fp32 (a padded batch rounds differently in the last bits, which in
bf16 can flip a near-tied argmax; see hb_utils.model.generation). The original loop calls
``model.generate`` once per question (no padding at all) and decodes the new tokens.

Perplexity is timed as 04_evaluate runs it: the config's own model settings (smoke: 4-bit NF4 with
compute dtype ``auto`` = bf16 on this CPU). The original method loads the model the original way
(``from_pretrained`` with the ``BitsAndBytesConfig``, bitsandbytes' defaults) and takes one
``model(ids, labels=ids)`` loss per example over the full text. The project runs
:func:`hb_utils.evaluate.perplexity.token_nll` (length-sorted batches of ``ppl_batch_size``, answer and full-text
NLL in one pass) on :func:`hb_utils.model.loading.load_base_model`'s model, which keeps bitsandbytes on
its dequantize + matmul path on CPU (see ``modeling.use_dequantize_matmul_path``). The project's
own passes without the shared prefix, batched and at batch size 1, are timed too, so the three gains
(kernel path, batching, shared prefix) are shown apart. The per-example full-text losses of both
methods must agree (bf16 rounding aside).

External sets (``--parts ext``, the sets and judge of ``--ext-params``): the first ``--ext-n`` questions of each
set answered as 04 answers them (the config's own model settings, greedy, ``gen_batch_size``; the base model, whose
cost equals the adapter's within a few percent), then the judge (``judge_model``) on the labelled set (its accuracy
is printed with its speed) and on every (answer, statement) pair of the sets with statements.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import bench_machine as machine  # benchmarks/ is on sys.path when this file runs as a script
import numpy as np
import torch

from hb_utils.config import load_config
from hb_utils.data import medquad
from hb_utils.evaluate import perplexity
from hb_utils.model import device, loading, source
from hb_utils.model.generation import GenResult, build_prompt, generate_answers, prompt_ids
from hb_utils.model.source import load_tokenizer
from hb_utils.model.tokenizer import stop_token_ids


def one_at_a_time(model, tokenizer, questions, system_prompt, max_new_tokens) -> list[GenResult]:
    """The original notebook's loop (with its prompt/decoding faults fixed so the texts are comparable)."""
    stops = stop_token_ids(tokenizer)
    out = []
    for q in questions:
        enc = tokenizer(build_prompt(tokenizer, q, system_prompt), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = ids[0, enc["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        answer = new if cut is None else new[:cut]
        out.append(GenResult(tokenizer.decode(answer, skip_special_tokens=True).strip(),
                             len(new) if cut is None else cut + 1, cut is not None))
    return out


def original_perplexity_loop(model, tokenizer, conversations) -> np.ndarray:
    """The original notebook's perplexity: one forward per example, the loss over its full text."""
    losses = []
    for conv in conversations:
        ids, _ = perplexity.tokenize_for_perplexity(tokenizer, conv)
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            losses.append(float(model(input_ids=x, labels=x).loss))
    return np.array(losses)


def load_as_original(cfg):
    """The model as the original notebook loads it: ``from_pretrained`` with the BitsAndBytesConfig and
    bitsandbytes' default kernels (the same weights, quantization and compute dtype as the project's)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": device.resolve_compute_dtype(cfg.compute_dtype)}
    qconf = loading.quantization_config(cfg)
    if qconf is not None:
        kwargs.update(quantization_config=qconf, device_map={"": "cuda" if torch.cuda.is_available() else "cpu"})
    return AutoModelForCausalLM.from_pretrained(source.resolve_model_path(cfg.model_name), **kwargs).eval()


RATES: dict[str, float] = {}  # this machine's GEMM rates, measured at the start of the run (bench_machine)


def dtype_label(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_generation(cfg, chosen, repeats: int, sizes: list[int] = ()) -> None:
    questions = [r["question"] for r in chosen]
    model = loading.load_base_model(cfg)
    tokenizer = load_tokenizer(cfg.model_name)
    print(f"generation: {cfg.model_name} (4-bit={cfg.load_in_4bit}, "
          f"dtype={device.resolve_compute_dtype(cfg.compute_dtype)}), {len(questions)} questions, greedy, "
          f"max_new_tokens={cfg.eval_max_new_tokens}, batch_size={cfg.gen_batch_size}")
    kw = {"max_new_tokens": cfg.eval_max_new_tokens}
    generate_answers(model, tokenizer, questions[:2], cfg.system_prompt, batch_size=2, progress=False, **kw)  # warm-up

    t_batch, batched = timed(lambda: generate_answers(model, tokenizer, questions, cfg.system_prompt,
                                                      batch_size=cfg.gen_batch_size, progress=False, **kw), repeats)
    t_loop, looped = timed(lambda: one_at_a_time(model, tokenizer, questions, cfg.system_prompt,
                                                 cfg.eval_max_new_tokens), repeats)
    same = sum(a.text == b.text for a, b in zip(batched, looped, strict=True))
    print(f"generation  batched {t_batch:7.1f} s | one at a time {t_loop:7.1f} s | speed-up {t_loop / t_batch:4.1f}x "
          f"(target >= 5x) | identical texts {same}/{len(questions)}")
    tokens = sum(r.n_new_tokens for r in batched)
    print(f"            {tokens} new tokens; stopped by themselves: {sum(r.stopped for r in batched)}/{len(batched)}")
    # useful matmul work: every prompt token once (prefill) and every new token (decode), 2 FLOP per weight
    prompt_tokens = sum(len(prompt_ids(tokenizer, q, cfg.system_prompt)) for q in questions)
    worked = 2 * machine.matmul_params(model) * (prompt_tokens + tokens)
    print(f"            achieved: batched {machine.share(worked, t_batch, RATES['fp32'])}, one at a time "
          f"{machine.share(worked, t_loop, RATES['fp32'])} (fp32 GEMM {RATES['fp32']} GFLOP/s)")
    for size in sizes:  # the per-class choice of gen_batch_size
        t, out = timed(lambda size=size: generate_answers(model, tokenizer, questions, cfg.system_prompt,
                                                          batch_size=size, progress=False, **kw), repeats)
        same = sum(a.text == b.text for a, b in zip(out, looped, strict=True))
        print(f"            gen_batch_size {size:3d}: {t:7.1f} s, {t_loop / t:4.1f}x the loop, "
              f"{t_batch / t:4.2f}x batch {cfg.gen_batch_size}, identical texts {same}/{len(questions)}")


def bench_perplexity(cfg, chosen, repeats: int, sizes: list[int] = ()) -> None:
    convs = [r["messages"] for r in chosen]
    tokenizer = load_tokenizer(cfg.model_name)
    original, project = load_as_original(cfg), loading.load_base_model(cfg)
    n_tokens = sum(len(perplexity.tokenize_for_perplexity(tokenizer, c)[0]) for c in convs)
    print(f"perplexity: {cfg.model_name} (4-bit={cfg.load_in_4bit}, "
          f"dtype={device.resolve_compute_dtype(cfg.compute_dtype)}), {len(convs)} test examples, "
          f"{n_tokens} tokens, ppl_batch_size={cfg.ppl_batch_size}")
    original_perplexity_loop(original, tokenizer, convs[:2])  # warm-up (bitsandbytes' first call repacks on CPU)
    perplexity.token_nll(project, tokenizer, convs[:2], batch_size=2, progress=False)

    t_orig, losses = timed(lambda: original_perplexity_loop(original, tokenizer, convs), repeats)
    t_b, nll_b = timed(lambda: perplexity.token_nll(project, tokenizer, convs, batch_size=cfg.ppl_batch_size,
                                                 progress=False), repeats)
    t_w, nll_w = timed(lambda: perplexity.token_nll(project, tokenizer, convs, batch_size=cfg.ppl_batch_size,
                                                    progress=False, share_prefix=False), repeats)
    t_1, nll_1 = timed(lambda: perplexity.token_nll(project, tokenizer, convs, batch_size=1, progress=False,
                                                    share_prefix=False), repeats)
    project_losses = nll_b["full_nll"] / nll_b["full_tokens"]
    rel = float(np.max(np.abs(project_losses - losses) / losses))
    print(f"perplexity  project (batch {cfg.ppl_batch_size}) {t_b:6.1f} s | original loop {t_orig:6.1f} s | "
          f"speed-up {t_orig / t_b:4.1f}x (target >= 3x)")
    dtype = device.resolve_compute_dtype(cfg.compute_dtype)
    rate = RATES.get("bf16" if dtype == torch.bfloat16 else "fp32", RATES["fp32"])
    worked = 2 * machine.matmul_params(project) * n_tokens
    print(f"            achieved: project {machine.share(worked, t_b, rate)}, original "
          f"{machine.share(worked, t_orig, rate)} ({dtype_label(dtype)} GEMM {rate} GFLOP/s)")
    print(f"            levers: bitsandbytes dequantize path {t_orig / t_1:4.1f}x (project one at a time "
          f"{t_1:.1f} s), batching {t_1 / t_w:4.1f}x ({t_w:.1f} s), shared system turn {t_w / t_b:4.1f}x")
    print(f"            original-variant ppl {math.exp(losses.mean()):.4f} (original) vs "
          f"{perplexity.original_perplexity(nll_b)['ppl']:.4f} (project); per-example full-text losses differ by "
          f"<= {rel:.1e} (relative); answer ppl {perplexity.answer_perplexity(nll_b):.4f} / "
          f"{perplexity.answer_perplexity(nll_w):.4f} / {perplexity.answer_perplexity(nll_1):.4f} "
          "(project / no shared prefix / one at a time)")
    for size in sizes:  # the per-class choice of ppl_batch_size
        t, nll = timed(lambda size=size: perplexity.token_nll(project, tokenizer, convs, batch_size=size,
                                                              progress=False), repeats)
        diff = float(np.max(np.abs(nll["full_nll"] / nll["full_tokens"] - project_losses)))
        print(f"            ppl_batch_size {size:3d}: {t:6.1f} s, {t_orig / t:4.1f}x the loop, "
              f"{t_b / t:4.2f}x batch {cfg.ppl_batch_size}, per-example losses within {diff:.1e}")


def bench_external(cfg, n: int, repeats: int) -> None:
    from hb_utils.evaluate import external, judge

    sets = external.configured_sets(cfg)
    if not sets:
        raise SystemExit(f"--ext-params names no external set (external_eval is empty in {cfg.experiment})")
    model, tokenizer = loading.load_base_model(cfg), load_tokenizer(cfg.model_name)
    kw = {"max_new_tokens": cfg.eval_max_new_tokens, "batch_size": cfg.gen_batch_size, "progress": False}
    print(f"external sets: {cfg.model_name} (4-bit={cfg.load_in_4bit}, "
          f"dtype={device.resolve_compute_dtype(cfg.compute_dtype)}), first {n} questions per set, greedy, "
          f"max_new_tokens={cfg.eval_max_new_tokens}, "
          f"batch_size={cfg.gen_batch_size}")
    generate_answers(model, tokenizer, [sets[0].items[0].question], cfg.system_prompt, **kw)  # warm-up
    answered, total_s, total_n = [], 0.0, 0
    for s in sets:
        items = s.items[:n]
        t, res = timed(lambda items=items, model=model: generate_answers(
            model, tokenizer, [it.question for it in items], cfg.system_prompt, **kw), repeats)
        tokens = sum(r.n_new_tokens for r in res)
        prompt = sum(len(prompt_ids(tokenizer, it.question, cfg.system_prompt)) for it in items)
        print(f"  {s.name:24s} {len(items)} answers in {t:6.1f} s: {len(items) / t:5.2f} answers/s, "
              f"{tokens / t:6.1f} new tokens/s (prompts {prompt / len(items):.0f} tokens on average)")
        answered.append((items, res))
        total_s, total_n = total_s + t, total_n + len(items)
    print(f"  all sets: {total_n / total_s:.2f} answers/s (one system; 04 answers twice: base and fine-tuned)")
    del model
    external.free_memory()
    if not cfg.judge_model.strip():
        print("judge: judge_model is empty, nothing to time")
        return
    jmodel, jtok = judge.load_judge(cfg)
    labels = judge.load_labels()
    judge.judge(jmodel, jtok, [(labels[0]["answer"], labels[0]["statement"])], batch_size=1)  # warm-up
    t, (acc, _) = timed(lambda: judge.measure(jmodel, jtok, batch_size=cfg.judge_batch_size, labels=labels), repeats)
    print(f"judge: {cfg.judge_model}, batch_size={cfg.judge_batch_size}, greedy, max_new_tokens={judge.MAX_NEW_TOKENS}")
    print(f"  labelled set: {len(labels)} judgements in {t:6.1f} s: {len(labels) / t:5.2f} judgements/s; "
          f"{judge.reliability_label(acc)} ({acc['not_judged']} replies not judged, said yes/no "
          f"{acc['said_yes']}/{acc['said_no']})")
    pairs = [(r.text, st) for items, res in answered for it, r in zip(items, res, strict=True)
             for st in it.must_have + it.nice_to_have]
    if pairs:
        t, verdicts = timed(lambda: judge.judge(jmodel, jtok, pairs, batch_size=cfg.judge_batch_size), repeats)
        print(f"  statements of the answers above: {len(pairs)} judgements in {t:6.1f} s: {len(pairs) / t:5.2f} "
              f"judgements/s, {sum(v.met is None for v in verdicts)} not judged")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/smoke.yaml")
    ap.add_argument("--n", type=int, default=32, help="questions (>= 32 for the reported figure)")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each timing; medians are printed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--parts", default="gen,ppl", help="comma-separated: gen (generation), ppl (perplexity), "
                    "ext (external sets and the statement judge)")
    ap.add_argument("--ext-params", default="params/smoke_external.yaml", help="config of --parts ext (sets, judge)")
    ap.add_argument("--ext-n", type=int, default=8, help="questions per external set (--parts ext)")
    ap.add_argument("--gen-batch-sizes", default="", help="also time generation at these batch sizes (e.g. 8,16,64)")
    ap.add_argument("--ppl-batch-sizes", default="", help="also time perplexity at these batch sizes (e.g. 2,4,16)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="config override")
    args = ap.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - {"gen", "ppl", "ext"}:
        raise SystemExit(f"--parts takes gen, ppl and/or ext, got {args.parts!r}")
    try:
        args.sizes = {part: [int(x) for x in getattr(args, f"{part}_batch_sizes").split(",") if x.strip()]
                      for part in ("gen", "ppl")}
    except ValueError as exc:
        raise SystemExit(f"--gen-batch-sizes/--ppl-batch-sizes take comma-separated integers: {exc}") from None
    if any(size < 1 for sizes in args.sizes.values() for size in sizes):
        raise SystemExit("batch sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts, sizes = args.parts, args.sizes
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.params, **dict(args.p))
    chosen = []
    if parts & {"gen", "ppl"}:
        records = medquad.prepare_splits(cfg, write=False).records  # nothing is written
        chosen = (records["test"] + records["val"] + records["train"])[:args.n]
        print(f"{len(chosen)} examples (test split first)")
    print(f"torch threads={torch.get_num_threads()}")
    print(machine.cpu_line())
    RATES.update(machine.machine_rates())
    print("GEMM rate measured now: " + ", ".join(f"{k} {v} GFLOP/s" for k, v in RATES.items()), flush=True)
    if "gen" in parts:
        bench_generation(load_config(args.params, **{"load_in_4bit": False, "compute_dtype": "fp32", **dict(args.p)}),
                         chosen, args.repeats, sizes["gen"])
    if "ppl" in parts:
        bench_perplexity(cfg, chosen, args.repeats, sizes["ppl"])
    if "ext" in parts:
        bench_external(load_config(args.ext_params, **dict(args.p)), args.ext_n, args.repeats)


if __name__ == "__main__":
    main()
