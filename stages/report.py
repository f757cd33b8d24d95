"""report: the build report, `reports/build.html` (`fullstack_ml.card`), once the release
gate has measured the bento: lineage, data and drift, training curves, evaluation, the
compression trade-off, the gate's figures and the limits, on one self-contained page.

The bento carries the same page, rendered when it was packaged (before the gate ran on it),
and serves it at GET /card.
"""

import logging

from omegaconf import DictConfig

from fullstack_ml.card import gather, render
from fullstack_ml.paths import BUILD_REPORT, DIST_DIR, METRICS, VALIDATE_DETAILS
from fullstack_ml.stage import read_json, run, write_atomic

log = logging.getLogger("stages.report")


def main(cfg: DictConfig) -> None:
    bento = read_json(DIST_DIR / "bento.json")
    gate = {"metrics": read_json(METRICS["validate"]), "details": read_json(VALIDATE_DETAILS)}
    write_atomic(BUILD_REPORT, render(gather(bento["bento_tag"], gate)))
    log.info("wrote %s (bento %s)", BUILD_REPORT, bento["bento_tag"])


if __name__ == "__main__":
    run(main)
