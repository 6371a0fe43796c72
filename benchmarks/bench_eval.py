"""Evaluation speed: the project's batched generation and perplexity vs the original one-at-a-time loops.

    .venv/bin/python benchmarks/bench_eval.py                    # N=32 questions, params/smoke.yaml
    .venv/bin/python benchmarks/bench_eval.py --n 64 --repeats 3 -p load_in_4bit false

Both methods run in the same process on the same loaded model (SmolLM2-135M-Instruct of the smoke
config), with the same chat-template prompts, greedy decoding and max_new_tokens, so the ratio is
what counts on a shared machine. The model is loaded unquantized in fp32 by default: bitsandbytes'
4-bit path on a CPU without the optional ``kernels`` package dequantizes every weight at every
step (about 1 s per generated token here), which would make N=32 one-at-a-time take half an hour
and mostly time bitsandbytes; pass ``-p load_in_4bit true -p compute_dtype auto`` to time the
smoke run's own settings. The original loop calls ``model.generate`` once per question (no
padding at all) and decodes the new tokens. The check that both give identical texts needs fp32
(a padded batch rounds differently in the last bits, which in bf16 or 4-bit can flip a near-tied
argmax; see hb_utils.generation). Perplexity: :func:`hb_utils.metrics.token_nll` with the configured
batch size vs one example per forward pass; the numbers must agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from hb_utils import data, metrics, modeling
from hb_utils.config import load_config
from hb_utils.generation import GenResult, build_prompt, generate_answers


def one_at_a_time(model, tokenizer, questions, system_prompt, max_new_tokens) -> list[GenResult]:
    """The original notebook's loop (with its prompt/decoding faults fixed so the texts are comparable)."""
    stops = modeling.stop_token_ids(tokenizer)
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


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/smoke.yaml")
    ap.add_argument("--n", type=int, default=32, help="questions (>= 32 for the reported figure)")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each timing; medians are printed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="config override")
    args = ap.parse_args()
    overrides = {"load_in_4bit": False, "compute_dtype": "fp32", **dict(args.p)}
    cfg = load_config(args.params, **overrides)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    records = data.prepare_splits(cfg, write=False).records  # questions only; nothing is written
    pool = records["test"] + records["val"] + records["train"]
    chosen = pool[:args.n]
    questions = [r["question"] for r in chosen]
    model = modeling.load_base_model(cfg)
    tokenizer = modeling.load_tokenizer(cfg.model_name)
    print(f"model {cfg.model_name} (4-bit={cfg.load_in_4bit}, dtype={modeling.resolve_compute_dtype(cfg.compute_dtype)}),"
          f" {len(questions)} questions, greedy, max_new_tokens={cfg.eval_max_new_tokens}, "
          f"batch_size={cfg.gen_batch_size}, torch threads={torch.get_num_threads()}")
    kw = {"max_new_tokens": cfg.eval_max_new_tokens}
    generate_answers(model, tokenizer, questions[:2], cfg.system_prompt, batch_size=2, progress=False, **kw)  # warm-up

    t_batch, batched = timed(lambda: generate_answers(model, tokenizer, questions, cfg.system_prompt,
                                                      batch_size=cfg.gen_batch_size, progress=False, **kw), args.repeats)
    t_loop, looped = timed(lambda: one_at_a_time(model, tokenizer, questions, cfg.system_prompt,
                                                 cfg.eval_max_new_tokens), args.repeats)
    same = sum(a.text == b.text for a, b in zip(batched, looped, strict=True))
    print(f"generation  batched {t_batch:7.1f} s | one at a time {t_loop:7.1f} s | speed-up {t_loop / t_batch:4.1f}x "
          f"(target >= 5x) | identical texts {same}/{len(questions)}")
    tokens = sum(r.n_new_tokens for r in batched)
    print(f"            {tokens} new tokens; stopped by themselves: {sum(r.stopped for r in batched)}/{len(batched)}")

    convs = [r["messages"] for r in chosen]
    t_pb, nll_b = timed(lambda: metrics.token_nll(model, tokenizer, convs, batch_size=cfg.ppl_batch_size,
                                                  progress=False), args.repeats)
    t_p1, nll_1 = timed(lambda: metrics.token_nll(model, tokenizer, convs, batch_size=1, progress=False), args.repeats)
    ppl_b, ppl_1 = metrics.answer_perplexity(nll_b), metrics.answer_perplexity(nll_1)
    close = all(np.allclose(nll_b[k], nll_1[k], rtol=1e-4) for k in nll_b)
    print(f"perplexity  batched {t_pb:7.1f} s | one at a time {t_p1:7.1f} s | speed-up {t_p1 / t_pb:4.1f}x "
          f"(target >= 3x) | ppl {ppl_b:.4f} vs {ppl_1:.4f}, per-example NLLs equal (rtol 1e-4): {close}")


if __name__ == "__main__":
    main()
