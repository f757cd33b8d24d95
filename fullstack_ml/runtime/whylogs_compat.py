"""What this project needs from whylogs 1.6 that whylogs does badly; import it before whylogs.

whylogs is unmaintained (last release 2024-12), so two fixes live here, applied once per
process on import:

- numpy 2 removed `np.unicode_`, which whylogs 1.6 still names once (`core/datatypes.py`);
  the alias is restored as `np.str_`, what numpy 1 defines it to be.
- whylogs checks a float column for infinities with a Python lambda per value
  (`floats.apply(lambda x: np.isinf(x))` in `core/preprocessing.py`): 94% of profiling time
  on float columns (cProfile here). Columns of a numpy float dtype are split here with whole-
  array numpy calls into exactly the counts and values whylogs computes; every other column
  (objects, extension dtypes, ints, strings) still takes whylogs' own path.

tests/test_whylogs_compat.py holds the profiles equal to unpatched whylogs' on the same data.
"""

import os
from types import ModuleType

import numpy as np

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "1")  # before the first whylogs import


def alias_unicode(numpy: ModuleType) -> None:
    """Give `numpy` the `unicode_` alias of `str_` where it lacks it (numpy 2); on numpy 1,
    where it is numpy's own alias of `str_`, nothing changes."""
    if not hasattr(numpy, "unicode_"):
        numpy.unicode_ = numpy.str_


alias_unicode(np)

import pandas as pd  # noqa: E402
import whylogs  # noqa: E402
from whylogs.core.preprocessing import PreprocessedColumn  # noqa: E402

PATCHED_VERSIONS = ("1.6.",)  # the whylogs whose `_pandas_split` the fast path was checked against
# whylogs' own split, also when this module is reloaded over an installed patch
_whylogs_split = getattr(
    PreprocessedColumn._pandas_split, "__wrapped__", PreprocessedColumn._pandas_split
)


def split_numpy_floats(
    self: PreprocessedColumn, series: pd.Series, parse_numeric_string: bool = False
) -> None:
    """`PreprocessedColumn._pandas_split` for a series of a numpy float dtype, vectorised.

    For these whylogs counts every null as a null and as a NaN (each is a float NaN), counts
    the infinities among the rest, and keeps the rest as float64 in `numpy.floats`; these
    are the same counts and values from whole-array calls. Other series go to whylogs."""
    if not (isinstance(series.dtype, np.dtype) and series.dtype.kind == "f"):
        return _whylogs_split(self, series, parse_numeric_string)
    values = series.to_numpy(dtype=np.float64)
    nulls = np.isnan(values)
    self.null_count = self.nan_count = int(nulls.sum())
    floats = values[~nulls]
    self.inf_count = int(np.isinf(floats).sum())
    self.numpy.floats = floats


split_numpy_floats.__wrapped__ = _whylogs_split


def patch() -> None:
    """Install the vectorised split (idempotent); whylogs outside `PATCHED_VERSIONS` is
    left as it is, and `patched()` then says so (a test fails)."""
    if whylogs.__version__.startswith(PATCHED_VERSIONS):
        PreprocessedColumn._pandas_split = split_numpy_floats


def patched() -> bool:
    return PreprocessedColumn._pandas_split is split_numpy_floats and hasattr(np, "unicode_")


patch()
