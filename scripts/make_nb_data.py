"""Author notebooks/01_eda.ipynb and notebooks/02_format_split.ipynb (run: python scripts/make_nb_data.py)."""

from nbtools import NOTEBOOKS, standard_head, write_notebook

ATTRIBUTION = """\
Data: **MedQuAD** (Ben Abacha & Demner-Fushman, *A question-entailment approach to question answering*,
BMC Bioinformatics 20, 511, 2019), CC BY 4.0. Three MedlinePlus subsets ship without answers to respect
MedlinePlus copyright."""

EDA = standard_head(f"""\
# 01 · Exploring MedQuAD

What does the raw data hold before we clean anything? This notebook answers the questions that decide
the next steps: which sources actually have answers, how long questions and answers are (our model sees
at most `max_length` tokens), and how often the *same* question recurs — the reason `02_format_split`
splits by question rather than by row.

{ATTRIBUTION}""") + [
    ("code", """\
from IPython.display import display

from hb_utils import data, eda, plots
from hb_utils.paths import RunPaths, write_json

run = RunPaths.for_config(cfg)
raw, info = data.load_raw(cfg.dataset, cfg.dataset_split)
print(f"source: {info['source']} ({info['kind']})")
print(f"{info['rows']:,} QA pairs, {info['answered']:,} with an answer")
raw.head(3)"""),
    ("md", "## Columns: types, missing values, distinct values\n"
           "Empty strings count as missing: the XML release has empty `<Answer/>` elements where answers were removed."),
    ("code", "eda.overview(raw)"),
    ("md", "## Rows per source, answered vs unanswered\n"
           "Only answered pairs can be used for fine-tuning; whole sources drop out here."),
    ("code", """\
display(eda.per_source(raw))
plots.answered_by_source(raw, run.plot("eda_sources"));"""),
    ("md", "## Question types"),
    ("code", """\
display(eda.per_question_type(raw).head(15))
plots.question_types(raw, run.plot("eda_question_types"));"""),
    ("md", "## Lengths\nThe red line is the `max_answer_words` filter of the config; longer answers are dropped in 02."),
    ("code", """\
display(eda.length_summary(raw))
plots.length_distributions(raw, cfg.max_answer_words, run.plot("eda_lengths"));"""),
    ("md", "## Duplicate questions\n"
           "The same normalized question (lowercase, no punctuation) under several sources or documents. "
           "A random *row* split puts copies on both sides of the train/test line, so test scores would "
           "partly measure memorisation. This is why `split_by` defaults to `question`."),
    ("code", """\
dups = eda.duplicate_questions(raw)
write_json(run.data / "eda.json", {"source": info, "duplicates": dups, "data_fingerprint": cfg.fingerprint("data")})
dups"""),
    ("md", "**Next:** `02_format_split` cleans, filters, samples and splits these pairs into chat records."),
]

SPLIT = standard_head(f"""\
# 02 · Clean, sample, split and format

From raw pairs to training records, in four steps, each counted:

1. **clean** — strip HTML tags, collapse whitespace;
2. **filter** — keep questions longer than `min_question_chars`, answers longer than `min_answer_chars` and at
   most `max_answer_words` words; drop exact duplicate pairs;
3. **sample** `sample_size` pairs with `sample_seed`;
4. **split** train/val/test by `split_by` with `split_seed`: all pairs of one group (a normalized question, or a
   focus) land in the same split, so no test question is seen in training.

Records are chat messages (system, user, assistant); the model's own chat template renders them in 03.

{ATTRIBUTION}""") + [
    ("code", """\
import pandas as pd
from IPython.display import display

from hb_utils import data, plots
from hb_utils.paths import RunPaths

run = RunPaths.for_config(cfg)
prepared = data.prepare_splits(cfg)  # writes data/{train,val,test}.jsonl and data/stats.json
stats = prepared.stats"""),
    ("md", "## The filter funnel"),
    ("code", """\
display(pd.DataFrame(stats["funnel"]).set_index("step"))
plots.funnel(stats["funnel"], run.plot("split_funnel"));"""),
    ("md", "## Sampling\nIf the filters leave fewer pairs than `sample_size`, all of them are used and this says so."),
    ("code", "stats[\"sample\"]"),
    ("md", "## The split and its leakage\n"
           "How many validation/test questions also occur (normalized) in the training split — for the chosen "
           "`split_by`, and for a plain row split of the same sample (the original method) for comparison."),
    ("code", """\
split = stats["split"]
display(pd.DataFrame({"pairs": split["sizes"], "groups": split["groups"]}))
pd.DataFrame({f"split_by={split['by']}": split["leakage"], "split_by=row (original)": split["leakage_if_split_by_row"]})"""),
    ("code", "plots.split_lengths(prepared.frames, run.plot(\"split_lengths\"));"),
    ("md", "## One record\nThe stored record is model-agnostic chat messages. Shown here in the TinyLlama/Zephyr "
           "layout of the original notebook; training renders it with the model's own template."),
    ("code", """\
example = prepared.records["train"][0]
print(data.render_zephyr(example["messages"]))"""),
    ("md", "## Files written\nEach is stamped with the data fingerprint; 03 rebuilds them if they are missing."),
    ("code", """\
print("data fingerprint:", stats["data_fingerprint"])
for name, path in prepared.files.items():
    print(f"{name:6s} {path}")"""),
]

if __name__ == "__main__":
    write_notebook(NOTEBOOKS / "01_eda.ipynb", EDA)
    write_notebook(NOTEBOOKS / "02_format_split.ipynb", SPLIT)
    print("wrote 01_eda.ipynb, 02_format_split.ipynb")
