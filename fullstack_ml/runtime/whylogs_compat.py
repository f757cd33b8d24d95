"""What this project needs from whylogs 1.6 that whylogs does badly; import it before whylogs.

whylogs is unmaintained (last release 2024-12), so its fixes live here, applied once per
process on import:

- numpy 2 removed `np.unicode_`, which whylogs 1.6 still names once (`core/datatypes.py`);
  the alias is restored as `np.str_`, what numpy 1 defines it to be.
- whylogs checks a float column for infinities with a Python lambda per value
  (`floats.apply(lambda x: np.isinf(x))` in `core/preprocessing.py`): 94% of profiling time
  on float columns (cProfile here). Columns of a numpy float dtype are split here with whole-
  array numpy calls into exactly the counts and values whylogs computes.
- For object columns whylogs runs six lambdas per value to sort floats, ints, bools, strings
  and tensors apart: 27 of 36 s of profiling 1M rows of 40 float and 10 string columns here.
  Object columns whose values are all strings (pandas' `infer_dtype`, in C) are split here
  into the same counts and series; whylogs still checks the nulls, a few, its own way.
Every other column (mixed objects, extension dtypes, ints) takes whylogs' own path.
- whylogs imports scikit-learn (`core/stubs.py`) for its experimental embedding metrics,
  which this project does not use: 1.5 s of every process that imports whylogs (the profile
  and predict stages, each server worker). It is imported here with those modules hidden,
  so whylogs takes its own fallback (stubs), as where scikit-learn is not installed.
- whylogs' frequent items cut each string to 128 characters with a Python slice per value
  (`FrequentItemsMetric.columnar_update`), 1 of 8 s of profiling those 1M rows; a column of
  strings no longer than that (`max(map(len, ...))`: no Python frame a value) goes uncut.
- `whylogs.viz`'s `__init__` imports IPython (for notebooks); where IPython is not installed
  (a bento installs whylogs without the `viz` extra) it is made a bare package, so that the
  drift algorithms under it import.

tests/test_whylogs_compat.py holds the profiles equal to unpatched whylogs' on the same data.
"""

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "1")  # before the first whylogs import


def alias_unicode(numpy: ModuleType) -> None:
    """Give `numpy` the `unicode_` alias of `str_` where it lacks it (numpy 2); on numpy 1,
    where it is numpy's own alias of `str_`, nothing changes."""
    if not hasattr(numpy, "unicode_"):
        numpy.unicode_ = numpy.str_


alias_unicode(np)

# what `whylogs/core/stubs.py` imports from scikit-learn, all for embedding metrics
SKLEARN_STUBS = ("sklearn.cluster", "sklearn.decomposition", "sklearn.metrics.pairwise")


@contextmanager
def hidden(modules: tuple[str, ...]) -> Iterator[None]:
    """Within, importing one of `modules` not yet imported raises ImportError (a None entry
    in `sys.modules`, which Python checks before importing the parent package); after, they
    import as usual."""
    blocked = [name for name in modules if name not in sys.modules]
    sys.modules.update(dict.fromkeys(blocked))
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


import pandas as pd  # noqa: E402
import pandas.api.types as pdc  # noqa: E402

with hidden(SKLEARN_STUBS):
    import whylogs  # noqa: E402
from whylogs.core.metrics.metrics import FrequentItemsMetric, OperationResult  # noqa: E402
from whylogs.core.preprocessing import NumpyView, PreprocessedColumn  # noqa: E402


def viz_without_notebook() -> None:
    """Where IPython is not installed (a bento: whylogs without its `viz` extra, 80 MB of
    IPython, jedi, Pillow and pygments less), `whylogs.viz` becomes a bare package: its
    `__init__` imports IPython for the notebook visualizer, and the drift algorithms under
    it (`whylogs.viz.drift.column_drift_algorithms`: numpy and scipy) then import without."""
    if "whylogs.viz" in sys.modules or importlib.util.find_spec("IPython") is not None:
        return
    viz = ModuleType("whylogs.viz")
    viz.__path__ = [os.path.join(os.path.dirname(whylogs.__file__), "viz")]
    sys.modules["whylogs.viz"] = viz


viz_without_notebook()

PATCHED_VERSIONS = ("1.6.",)  # the whylogs whose `_pandas_split` the fast path was checked against
# whylogs' own split, also when this module is reloaded over an installed patch
_whylogs_split = getattr(
    PreprocessedColumn._pandas_split, "__wrapped__", PreprocessedColumn._pandas_split
)
_whylogs_frequent = getattr(
    FrequentItemsMetric.columnar_update, "__wrapped__", FrequentItemsMetric.columnar_update
)


def split_fast(
    self: PreprocessedColumn, series: pd.Series, parse_numeric_string: bool = False
) -> None:
    """`PreprocessedColumn._pandas_split`, vectorised for a series of a numpy float dtype
    and for an object series of strings (and nulls); other series go to whylogs."""
    if isinstance(series.dtype, np.dtype) and series.dtype.kind == "f":
        return split_floats(self, series)
    if series.dtype == object and not parse_numeric_string:
        nulls = series.isnull()
        rest = series[~nulls]
        if len(rest) and pdc.infer_dtype(rest, skipna=False) == "string":
            return split_strings(self, series[nulls], rest)
    return _whylogs_split(self, series, parse_numeric_string)


def split_strings(self: PreprocessedColumn, nulls: pd.Series, strings: pd.Series) -> None:
    """whylogs' split of an object series whose non-null values, `strings`, are all `str`:
    every type mask but the string one is empty, so no float, int, bool or tensor is kept."""
    self.null_count = len(nulls)
    if self.null_count:  # NaN (a float) counts as a NaN too, None does not
        numbers = nulls[nulls.apply(pdc.is_number)]
        if not numbers.empty:
            self.nan_count = numbers.astype(float).isna().sum()
    none = strings[np.zeros(len(strings), dtype=bool)]
    self.numpy = NumpyView(floats=none.to_numpy(), ints=pd.Series(dtype=int).to_numpy())
    self.pandas.strings = strings
    self.pandas.tensors = pd.Series([], dtype="object")
    self.pandas.objs = none
    self.bool_count = self.bool_count_where_true = 0


def split_floats(self: PreprocessedColumn, series: pd.Series) -> None:
    """For a numpy float series whylogs counts every null as a null and as a NaN (each is a
    float NaN), counts the infinities among the rest, and keeps the rest as float64 in
    `numpy.floats`; these are the same counts and values from whole-array calls."""
    values = series.to_numpy(dtype=np.float64)
    nulls = np.isnan(values)
    self.null_count = self.nan_count = int(nulls.sum())
    floats = values[~nulls]
    self.inf_count = int(np.isinf(floats).sum())
    self.numpy.floats = floats


def frequent_items_fast(self: FrequentItemsMetric, view: PreprocessedColumn) -> OperationResult:
    """`FrequentItemsMetric.columnar_update` without its per-value slice where it cuts
    nothing: the pandas strings go to the sketch uncut, in the order whylogs sends them
    (after floats, ints and numpy strings, which whylogs' own code still sends; only when
    nothing it sends after them, booleans or lists, is there)."""
    strings = view.pandas.strings
    later = view.bool_count or any(
        part is not None for part in (view.list.ints, view.list.floats, view.list.strings)
    )
    if strings is None or later:
        return _whylogs_frequent(self, view)
    values = strings.to_list()
    if max(map(len, values), default=0) > self.max_frequent_item_size:
        return _whylogs_frequent(self, view)
    view.pandas.strings = None
    try:
        result = _whylogs_frequent(self, view)
    finally:
        view.pandas.strings = strings
    self.frequent_strings.value.update_str_list(values)
    return result + OperationResult.ok(len(values))


split_fast.__wrapped__ = _whylogs_split
frequent_items_fast.__wrapped__ = _whylogs_frequent


def patch() -> None:
    """Install the vectorised split (idempotent); whylogs outside `PATCHED_VERSIONS` is
    left as it is, and `patched()` then says so (a test fails)."""
    if whylogs.__version__.startswith(PATCHED_VERSIONS):
        PreprocessedColumn._pandas_split = split_fast
        FrequentItemsMetric.columnar_update = frequent_items_fast


def patched() -> bool:
    return (
        PreprocessedColumn._pandas_split is split_fast
        and FrequentItemsMetric.columnar_update is frequent_items_fast
        and hasattr(np, "unicode_")
    )


patch()
