"""Author notebooks/05_qualitative.ipynb (run: python scripts/make_nb_05.py)."""

from nbtools import NOTEBOOKS, standard_head, write_notebook

CELLS = standard_head("""\
# 05 · Qualitative: what do the answers look like?

Numbers hide the texture of the answers. Here base and fine-tuned model (the same loaded weights, adapter on and
off) answer six standard prompts — four health questions and two **out-of-domain** requests a medical assistant
should decline or redirect — plus any extra `prompts` of the config.

Answers are **sampled** (`qual_temperature`, `qual_top_p`, `qual_repetition_penalty`, `qual_max_new_tokens`)
with the fixed seed `qual_seed`, so rerunning this notebook gives the same text.

Each answer gets simple, documented flags (heuristics, to guide reading — not a grade):

* **stopped** — ended by itself (end of turn) before the token limit;
* **disclaimer** — advises a doctor / physician / healthcare professional, or to consult / seek medical help
  (`hb_utils.metrics.DISCLAIMER_PATTERNS`);
* **on topic** (in-domain) — mentions a content word of the prompt (first five letters, stop words ignored);
* **declined** (out-of-domain) — refuses or redirects ("I'm sorry", "I can't", "outside my scope",
  "I only answer health questions" …);
* **EMPTY/LOOP** — no text, or a repetition loop (`hb_utils.metrics.is_looping`).""") + [
    ("code", """\
from IPython.display import Markdown, display

from hb_utils import evaluation

rows = evaluation.run_qualitative(cfg)  # writes metrics/qualitative.jsonl and metrics/qualitative.md
print("sampling:", rows[0]["sampling"])"""),
    ("md", "## Side by side"),
    ("code", "display(Markdown(evaluation.qualitative_markdown(rows)))"),
    ("md", "## Flags per prompt kind\nShare of answers with each flag (1.0 = all)."),
    ("code", "evaluation.flag_rates(rows)"),
    ("md", """\
**Reading guide.** A fine-tuned model that answers "What is the capital of France?" fluently has learnt style, not
scope; one that loops or never stops needs more steps or a lower learning rate. Keyword flags can be fooled in both
directions — read the answers."""),
]

if __name__ == "__main__":
    write_notebook(NOTEBOOKS / "05_qualitative.ipynb", CELLS)
    print("wrote 05_qualitative.ipynb")
