"""`reports/predict.html`: what a run scored, rejected and found drifted."""

import html
from typing import Any

from fullstack_ml.card import page, table


def report(result: dict[str, Any], source: str, model: str) -> str:
    """`reports/predict.html`: the run's figures, rejects by reason, drift per feature."""
    figures = result["metrics"]
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in figures.items()]
    parts = [f"<p>{html.escape(source)}, scored with {html.escape(model)}.</p>"]
    parts.append(table(["figure", "value"], rows))
    if result["reasons"]:
        parts.append("<h2>Rejected rows by reason</h2>")
        parts.append(table(["reason", "rows"], [[r, str(n)] for r, n in result["reasons"].items()]))
    scores = result["drift"]
    if scores:
        order = sorted(scores, key=lambda c: (scores[c] or {}).get("pvalue", 1.0) or 0.0)
        parts.append("<h2>Drift against the training profile (lowest p-value first)</h2>")
        parts.append(
            table(
                ["feature", "p-value", "category"],
                [
                    [c, f"{scores[c]['pvalue']:.3g}", scores[c]["drift_category"]]
                    if scores[c]
                    else [c, "", "not scored"]
                    for c in order
                ],
            )
        )
    return page("Batch predictions", "".join(parts))
