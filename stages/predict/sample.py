"""The drift of scored rows: a uniform sample of them, profiled against the training profile."""

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fullstack_ml.runtime.drift import drift_scores, load_profile, new_profile, reproducible


class Sample:
    """A uniform sample of at most `size` rows of a stream of parts (feature -> array): each
    row gets a uniform random key and the rows of the `size` smallest keys are kept
    (bottom-k sampling). Bounded memory, one whylogs profile at the end, and samples merge:
    a row that did not enter a part of the stream's sample cannot be in the whole's, so
    Ray's actors send the driver only the rows that entered their own."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.rows: dict[str, np.ndarray] = {}

    def add(self, part: dict[str, np.ndarray], keys: np.ndarray | None = None) -> np.ndarray:
        """Add a part's rows (`keys`: theirs; None: drawn here; `part` may be empty, to keep
        keys only). Returns which of them entered the sample."""
        if keys is None:
            keys = self.rng.random(len(next(iter(part.values()))))
        full = len(self.keys) >= self.size
        taken = keys < (self.keys.max() if full else np.inf)
        new = keys[taken]
        if not len(new):
            return taken
        rows = {c: v[taken] for c, v in part.items()}
        if not full:  # every row enters; past `size`, the largest keys leave
            self.keys = np.concatenate([self.keys, new])
            self.rows = {
                c: np.concatenate([self.rows[c], v]) if self.rows else v for c, v in rows.items()
            }
            if len(self.keys) > self.size:
                keep = np.sort(np.argpartition(self.keys, self.size - 1)[: self.size])
                self.keys, self.rows = self.keys[keep], {c: v[keep] for c, v in self.rows.items()}
            return taken
        keep = np.argpartition(np.concatenate([self.keys, new]), self.size - 1)[: self.size]
        slots = np.setdiff1d(np.arange(self.size), keep, assume_unique=True)  # in place
        incoming = keep[keep >= self.size] - self.size
        self.keys[slots] = new[incoming]
        for c, v in rows.items():
            self.rows[c][slots] = v[incoming]
        return taken

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, copy=False)


def drift(sample: Sample, reference: Path, categorical: list[str]) -> tuple[dict[str, Any], int]:
    """The sample's drift scores per feature against the training profile at `reference`,
    and the rows profiled (whylogs on a sample: on every row it took half of the loop)."""
    profile, rows = new_profile(), sample.frame()
    profile.track(pandas=rows)
    view = reproducible(profile.view())
    return drift_scores(view, load_profile(reference), categorical=categorical), len(rows)
