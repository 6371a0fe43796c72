"""Evaluation reruns on the same adapter: earlier metrics of another evaluation config are kept aside.

Why: 04 and 05 can be rerun with other evaluation parameters (``hb run -p eval_size all``, or the notebook
run by hand) without retraining, because their fingerprint scope is ``eval``. Their earlier metrics must
not be silently replaced, nor shown under the new parameters: they move to
``metrics/previous/<their eval fingerprint>/`` and ``config.json`` records the rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hb_utils.config import ExperimentConfig
from hb_utils.run_dir import RunPaths, claim, read_json, read_stamp, unique_sibling, utc_now, write_json

# The artifacts of the eval scope (04 and 05 share one eval fingerprint), per stage; the first file of a
# group that carries a fingerprint tells whose they are.
EVAL_ARTIFACTS = {
    "04_evaluate": ("metrics/eval.json", "metrics/predictions.jsonl", "metrics/external_predictions.jsonl",
                    "plots/eval_comparison.png"),
    "05_qualitative": ("metrics/qualitative.jsonl", "metrics/qualitative.md"),
}
PREVIOUS = "metrics/previous"


def _eval_fingerprint(path: Path) -> str | None:
    """The eval fingerprint an eval artifact records (eval.json's stamp, a JSON-lines row's "fingerprint")."""
    try:
        if path.suffix == ".json":
            return ((read_stamp(path) or {}).get("fingerprints") or {}).get("eval")
        if path.suffix == ".jsonl":
            with path.open() as fh:
                first = next((line for line in fh if line.strip()), None)
            return json.loads(first).get("fingerprint") if first else None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def set_aside_eval(paths: RunPaths, cfg: ExperimentConfig, *, made_by: str,
                   reports: bool = False) -> list[dict[str, Any]]:
    """Move the eval-scope artifacts (metrics of 04/05) that another eval config made to
    ``metrics/previous/<their eval fingerprint>/``, so a rerun with other evaluation parameters on the same
    adapter never silently replaces them. ``reports``: also their executed notebooks (only when no notebook
    is running, i.e. from ``hb run`` before the stages start). Returns one record per stage moved."""
    mine = cfg.fingerprint("eval")
    targets: dict[str, Path] = {}
    moved = []
    for stage, rels in EVAL_ARTIFACTS.items():
        present = [paths.root / rel for rel in rels if (paths.root / rel).is_file()]
        if not present:
            continue
        found = next((fp for fp in map(_eval_fingerprint, present) if fp), None)
        if found == mine:
            continue
        label = found or "unstamped"
        if label not in targets:
            targets[label] = unique_sibling(paths.root / PREVIOUS / label)
            targets[label].mkdir(parents=True)
        dest = targets[label]
        params = next(((read_stamp(p) or {}).get("params") for p in present if p.suffix == ".json"), None)
        if reports:
            present += [p for p in (paths.reports / f"{stage}.ipynb", paths.reports / f"{stage}.html") if p.is_file()]
        for p in present:
            os.rename(p, unique_sibling(dest / p.name))
        moved.append({"stage": stage, "eval_fingerprint": found, "moved_to": str(dest.relative_to(paths.root)),
                      "files": [p.name for p in present], "params": params,
                      "moved": utc_now(), "by": made_by})
    for label, dest in targets.items():
        write_json(dest / "moved.json", {"why": f"replaced by eval config {mine}", "records": [
            m for m in moved if (m["eval_fingerprint"] or "unstamped") == label]})
    return moved


def record_eval_rerun(cfg: ExperimentConfig, stage: str, *, made_by: str) -> list[dict[str, Any]]:
    """Called by 04/05 just before they write their metrics: keep another eval config's metrics aside
    (:func:`set_aside_eval`) and, when ``config.json`` records the same adapter (data and train scope) with
    other eval parameters (04/05 run directly with papermill or Jupyter), update it to this config, mark
    the other eval stage stale and record what moved — so config.json, the metrics and ``hb compare``
    agree, and nothing was replaced silently."""
    paths = claim(cfg, made_by=made_by)
    moved = set_aside_eval(paths, cfg, made_by=made_by)
    if not paths.config_json.is_file():
        return moved
    payload = read_json(paths.config_json)
    prints = payload.get("fingerprints") or {}
    if prints.get("eval") != cfg.fingerprint("eval") and prints.get("train") == cfg.fingerprint("train"):
        old = payload.get("config") or {}
        changed = [f"{n}: {a!r} -> {b!r}" for n, (a, b) in cfg.differences(old, "eval").items()]
        payload["config"], payload["fingerprints"] = cfg.to_dict(), cfg.fingerprints()
        for other in EVAL_ARTIFACTS:
            if other != stage:
                payload.setdefault("stages", {})[other] = {
                    "status": "stale", "reason": f"{stage} ran with other eval parameters ({'; '.join(changed)})"}
        payload.setdefault("eval_history", []).append({"by": made_by, "at": utc_now(), "changed": changed,
                                                       "moved": moved})
        write_json(paths.config_json, payload)
        where = f"; the previous metrics are kept in {moved[0]['moved_to']}/" if moved else ""
        print(f"[{stage}] eval parameters differ from config.json ({'; '.join(changed)}){where}; config.json now "
              "records this config.", flush=True)
    elif moved:
        payload.setdefault("eval_history", []).append({"by": made_by, "at": utc_now(), "moved": moved})
        write_json(paths.config_json, payload)
    return moved
