"""Author notebooks/04_evaluate.ipynb (run: python scripts/make_nb_04.py)."""

from nbtools import NOTEBOOKS, standard_head, write_notebook

CELLS = standard_head("""\
# 04 · Evaluate: base vs fine-tuned on held-out test questions

Does the adapter help, and by how much *more than noise*? We load the base model **once** with the adapter
on top and answer the first `eval_size` test questions twice with the same greedy settings
(`eval_max_new_tokens`): with the adapter, and with it switched off (`model.disable_adapter()`), so the only
difference between the two systems is the adapter.

What is measured, and why:

* **ROUGE-1/2/L/Lsum** (`rouge-score`, stemming) and **corpus BLEU** (`sacrebleu`): overlap with the MedQuAD
  reference answer. Only the *new* tokens are scored — never the prompt — and questions go through the model's
  chat template exactly as in training.
* **95% bootstrap intervals** over questions for every number, and a **paired** bootstrap of fine-tuned minus
  base (the same resampled questions for both). With a few dozen questions, differences inside the interval are
  not evidence.
* **Perplexity** of the reference answers, token-weighted over the whole set (total NLL / total answer tokens;
  the prompt is masked). The original notebook's variant (full text, mean of per-example losses) is shown next to
  it, labelled, for comparison only.
* **Behaviour**: does the answer stop by itself before the token limit, how long is it, does it advise seeing a
  healthcare professional, is it empty or stuck in a loop.""") + [
    ("code", """\
import pandas as pd
from IPython.display import display

from hb_utils import evaluation
from hb_utils.paths import RunPaths

run = RunPaths.for_config(cfg)
result = evaluation.run_evaluation(cfg)  # writes metrics/eval.json and metrics/predictions.jsonl
settings = result["settings"]
print(f"{settings['eval_examples']} of {settings['test_size']} test questions, greedy, "
      f"max_new_tokens={settings['max_new_tokens']}; perplexity on {settings['ppl_examples']} answers")
print("seconds:", result["seconds"])"""),
    ("md", """\
## Text overlap and behaviour, with 95% intervals
ROUGE and the behaviour rates in percent, BLEU on its 0–100 scale, lengths in words/tokens. *difference* is
fine-tuned − base from the paired bootstrap; *P(not better)* is the share of resamples where the fine-tuned model
did not beat the base (fewer empty/looping answers count as better; lengths have no better direction)."""),
    ("code", "evaluation.comparison_table(result)"),
    ("code", 'evaluation.plot_comparison(result, run.plot("eval_comparison"));'),
    ("md", """\
## Perplexity of the reference answers
Lower is better. The first row is the number to use. The second reproduces the original notebook's method —
each example's loss over its *full* text (prompt included), averaged over examples — which weights a short answer
like a long one and rewards predicting the fixed system prompt."""),
    ("code", 'display(evaluation.perplexity_table(result))\nresult["perplexity"]["delta"]'),
    ("md", """\
## Best and worst answers by ROUGE-L
ROUGE-L rewards wording, not correctness: read the texts. Ranked by the fine-tuned model's ROUGE-L."""),
    ("code", """\
preds = evaluation.load_predictions(cfg)
with pd.option_context("display.max_colwidth", 400):
    display(evaluation.extreme_examples(preds, k=2, best=True))
    display(evaluation.extreme_examples(preds, k=2, best=False))"""),
    ("md", "## Implementations and provenance\nEvery number above comes from these libraries and settings."),
    ("code", """\
print("config fingerprints:", result["fingerprints"])
print("adapter:", result["adapter_meta"])
for name, impl in result["implementations"].items():
    print(f"{name:10s} {impl}")
print("files:", run.metrics / "eval.json", run.metrics / "predictions.jsonl")"""),
    ("md", "**Next:** `05_qualitative` reads answers to hand-picked prompts, in-domain and out-of-domain."),
]

if __name__ == "__main__":
    write_notebook(NOTEBOOKS / "04_evaluate.ipynb", CELLS)
    print("wrote 04_evaluate.ipynb")
