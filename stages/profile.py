"""profile: whylogs profiles of the curated splits, data-quality constraints, drift.

Writes `reports/profile/{train,val,test}.bin` (whylogs profiles), `constraints.json`,
`drift.json` and `report.html` (self-contained), and `metrics/profile.json`.
Fails, writing nothing, when a constraint is violated on the train split.
"""

import html
import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "1")  # before the first whylogs import

import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from whylogs.core.constraints import ConstraintsBuilder  # noqa: E402
from whylogs.core.constraints.factories import (  # noqa: E402
    frequent_strings_in_reference_set,
    is_in_range,
    no_missing_values,
)

from stages.common import StageError, atomic_dir, read_json, run, write_atomic, write_json  # noqa: E402
from stages.drift import DatasetProfileView, drift_scores, drifted, profile_frame  # noqa: E402
from stages.ingest import OUT_DIR as DATA_DIR  # noqa: E402
from stages.ingest import SPLITS, load_split  # noqa: E402

log = logging.getLogger("stages.profile")
OUT_DIR = Path("reports/profile")
METRICS = Path("metrics/profile.json")


def check_constraints(
    view: DatasetProfileView, constraints: dict[str, Any], target: str, classes: list[Any]
) -> list[dict[str, Any]]:
    """Check the `profile.constraints` config on a profile.

    Returns:
        One entry per constraint: name, column, passed, observed value.
    """
    columns = list(view.get_columns())
    features = [c for c in columns if c != target]
    checks = []  # (column, constraint, what to show of the column's summary)
    if constraints.get("no_missing_values"):
        checks += [(c, no_missing_values(c), "counts/null") for c in columns]
    if constraints.get("feature_range") is not None:
        lo, hi = constraints["feature_range"]
        checks += [
            (
                c,
                is_in_range(c, lo, hi, skip_missing=False),
                ("distribution/min", "distribution/max"),
            )
            for c in features
        ]
    if constraints.get("target_in_classes"):
        allowed = {str(c) for c in classes}  # whylogs keeps frequent items as strings
        check = frequent_strings_in_reference_set(target, allowed)
        check.name = f"{target} values in the {len(classes)} known classes"
        checks.append((target, check, "frequent_items/frequent_strings"))
    builder = ConstraintsBuilder(dataset_profile_view=view)
    for _, check, _ in checks:
        builder.add_constraint(check, ignore_missing=True)
    results = {r.name: r.passed for r in builder.build().generate_constraints_report()}
    report = []
    for column, check, shown in checks:
        summary = view.get_column(column).to_summary_dict()
        if isinstance(shown, tuple):
            observed: Any = [summary.get(k) for k in shown]
        elif shown.startswith("frequent"):
            items = summary.get(shown)
            observed = sorted(i.value for i in items) if items else "no frequent items (float?)"
        else:
            observed = summary.get(shown)
        passed = bool(results.get(check.name)) and observed != "no frequent items (float?)"
        report.append(
            {"constraint": check.name, "column": column, "passed": passed, "observed": observed}
        )
    return report


def render_html(constraints: list[dict[str, Any]], drift: dict[str, dict[str, Any]]) -> str:
    """One self-contained page (no scripts, no network): constraints and drift per column."""
    esc = html.escape
    colour = {"NO_DRIFT": "#d7f2d7", "POSSIBLE_DRIFT": "#fff2b3", "DRIFT": "#f7c6c6"}
    failed = [r for r in constraints if not r["passed"]]
    rows = "".join(
        f"<tr><td>{esc(r['constraint'])}</td><td>{esc(json.dumps(r['observed']))}</td></tr>"
        for r in failed
    )
    head = "".join(f"<th>{s} p-value</th><th>{s} category</th>" for s in drift)
    body = []
    for col in next(iter(drift.values())):
        cells = []
        for scores in drift.values():
            s = scores.get(col) or {}
            cat = s.get("drift_category") or "UNKNOWN"
            p = "-" if s.get("pvalue") is None else f"{s['pvalue']:.4g}"
            cells.append(f"<td>{p}</td><td style='background:{colour.get(cat, '#eee')}'>{cat}</td>")
        body.append(f"<tr><td>{esc(col)}</td>{''.join(cells)}</tr>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data profile</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style></head><body>"
        f"<h2>Constraints on train: {len(constraints) - len(failed)} passed, "
        f"{len(failed)} failed</h2><table>{rows}</table>"
        f"<h2>Drift against train</h2><table><tr><th>column</th>{head}</tr>{''.join(body)}"
        "</table></body></html>"
    )


def profile(
    splits: dict[str, pd.DataFrame], schema: dict[str, Any], cfg: DictConfig, out_dir: Path
) -> dict[str, Any]:
    """Profile every split, check constraints on train, score drift, write `out_dir`.

    Returns:
        The summary written to the metrics file.
    """
    target, classes = schema["target"]["name"], schema["classes"]
    views = {}
    for name, df in splits.items():
        log.info("profiling %s: %d rows x %d columns", name, *df.shape)
        views[name] = profile_frame(df)
    constraints = OmegaConf.to_container(cfg.constraints, resolve=True)
    report = check_constraints(views["train"], constraints, target, classes)
    failed = [r for r in report if not r["passed"]]
    if failed:
        lines = [f"{r['constraint']} (observed {r['observed']})" for r in failed]
        for line in lines:
            log.error("FAILED %s", line)
        raise StageError(
            f"{len(failed)} of {len(report)} profile.constraints failed on the train split,"
            f" first: {lines[0]}"
        )
    log.info("constraints on train: %d passed", len(report))
    drift = {s: drift_scores(views[s], views["train"], target) for s in splits if s != "train"}
    for split, scores in drift.items():
        log.info(
            "drift %s vs train: %d of %d columns DRIFT %s",
            split,
            len(drifted(scores)),
            len(scores),
            drifted(scores) or "",
        )
    bad = {s: drifted(d) for s, d in drift.items() if drifted(d)}
    if cfg.drift.fail_on_drift and bad:
        raise StageError(f"drift against train (profile.drift.fail_on_drift): {bad}")
    with atomic_dir(out_dir) as tmp:
        for name, view in views.items():
            (tmp / f"{name}.bin").write_bytes(view.serialize())
        write_json(tmp / "constraints.json", report)
        write_json(tmp / "drift.json", drift)
        write_atomic(tmp / "report.html", render_html(report, drift))
    return {
        "constraints_passed": len(report),
        "drifted_columns": {s: len(drifted(d)) for s, d in drift.items()},
    }


def main(cfg: DictConfig) -> None:
    schema = read_json(DATA_DIR / "schema.json")
    splits = {name: load_split(name) for name in SPLITS}
    summary = profile(splits, schema, cfg.profile, OUT_DIR)
    write_json(METRICS, summary)
    log.info("wrote %s (profiles, constraints, drift, report.html), %s", OUT_DIR, METRICS)


if __name__ == "__main__":
    run(main)
