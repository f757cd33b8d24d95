"""The whylogs compatibility module changes how fast whylogs profiles, never what it counts:
profiles made with it equal those of unpatched whylogs (run in a fresh process, since the
patch is process-global) on the same data."""

import math
import pickle
import subprocess
import sys
import types
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fullstack_ml.runtime import whylogs_compat  # before whylogs: it patches it

# isort: split
import whylogs as why
from whylogs.core.preprocessing import PreprocessedColumn

from fullstack_ml.runtime.drift import DatasetProfileView, profile_frame

ROWS = 3000  # under drift.KLL_K: the quantile sketches stay exact, so both sides compare equal


def frames() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(7)
    floats = rng.normal(size=ROWS)
    at = rng.permutation(ROWS)
    floats[at[:300]], floats[at[300:320]], floats[at[320:340]] = np.nan, np.inf, -np.inf
    mixed = [1, 2.5, "a", None, np.nan, True, False, math.inf, -math.inf, Decimal("1.5"), (1,)]
    random = pd.DataFrame(
        {
            "floats": floats,
            "float32": rng.normal(size=ROWS).astype(np.float32),
            "float16_inf": np.where(rng.random(ROWS) < 0.1, np.inf, 1.0).astype(np.float16),
            "all_nan": np.full(ROWS, np.nan),
            "no_nulls": rng.uniform(-1e9, 1e9, size=ROWS),
            "ints": rng.integers(-1000, 1000, size=ROWS),
            "nullable_ints": pd.array(
                np.where(rng.random(ROWS) < 0.1, None, rng.integers(0, 9, ROWS)), dtype="Int64"
            ),
            "nullable_floats": pd.array(
                np.where(rng.random(ROWS) < 0.1, None, rng.normal(size=ROWS)), dtype="Float64"
            ),
            "strings": rng.choice(["red", "green", "blue", None], size=ROWS),
            "strings_nan": rng.choice(np.array(["x", "y", np.nan], dtype=object), size=ROWS),
            "strings_only": rng.choice(["x", "yy", "zzz"], size=ROWS).astype(object),
            # frequent items keep 128 characters: one column cut, one exactly at the limit
            "long_strings": rng.choice(["s" * 200, "t" * 129, "u", None], size=ROWS),
            "limit_strings": rng.choice(["v" * 128, "w"], size=ROWS).astype(object),
            "bools": rng.random(ROWS) < 0.3,
            "nullable_bools": pd.array(
                np.where(rng.random(ROWS) < 0.1, None, rng.random(ROWS) < 0.5), dtype="boolean"
            ),
            "mixed": [mixed[i % len(mixed)] for i in range(ROWS)],
        }
    )
    return {
        "random": random,
        "edges": pd.DataFrame(
            {
                "inf_only": [np.inf, -np.inf, np.inf],
                "none_in_floats": pd.Series([None, 1.0, None], dtype=float),
                "zeros": [0.0, -0.0, 0.0],
                "extremes": [np.finfo(float).max, np.finfo(float).tiny, -np.finfo(float).max],
            }
        ),
        "empty": pd.DataFrame({"floats": pd.Series([], dtype=float)}),
        "served": pd.DataFrame(rng.normal(size=(64, 4)), columns=list("abcd")),  # as drift does
    }


# Profiles the pickled frames with unpatched whylogs (given only the numpy-2 alias, without
# which it cannot run there) and the schema of `drift.profile_frame`; pickles the profiles.
UNPATCHED = """
import os, pickle, sys
os.environ["WHYLOGS_NO_ANALYTICS"] = "1"
import numpy as np
if not hasattr(np, "unicode_"):
    np.unicode_ = np.str_
import whylogs as why
from whylogs.core.metrics.metrics import MetricConfig
from whylogs.core.preprocessing import PreprocessedColumn
from whylogs.core.schema import DatasetSchema
assert PreprocessedColumn._pandas_split.__module__ == "whylogs.core.preprocessing"
frames = pickle.loads(open(sys.argv[1], "rb").read())
config = MetricConfig(kll_k_large=int(sys.argv[2]))
views = {}
for name, df in frames.items():  # a schema learns the columns it sees: one a frame
    views[name] = why.log(pandas=df, schema=DatasetSchema(default_configs=config)).view()
sys.stdout.buffer.write(pickle.dumps({name: v.serialize() for name, v in views.items()}))
"""


def plain(value):
    """A summary value comparable with ==: NaN as a marker, sketch items as tuples."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return tuple(plain(getattr(value, f)) for f in value.__dataclass_fields__)
    return value


def summaries(view) -> dict[str, dict]:
    return {
        name: {k: plain(v) for k, v in column.to_summary_dict().items()}
        for name, column in view.get_columns().items()
    }


def test_profiles_with_the_patch_equal_those_of_unpatched_whylogs(tmp_path: Path) -> None:
    from fullstack_ml.runtime.drift import KLL_K

    data = frames()
    (tmp_path / "frames.pkl").write_bytes(pickle.dumps(data))
    unpatched = subprocess.run(
        [sys.executable, "-c", UNPATCHED, tmp_path / "frames.pkl", str(KLL_K)],
        check=True,
        capture_output=True,
    ).stdout
    want = {
        name: summaries(DatasetProfileView.deserialize(view))
        for name, view in pickle.loads(unpatched).items()
    }
    # as stored: a profile read back lists frequent items of equal counts in another order
    have = {
        name: summaries(DatasetProfileView.deserialize(profile_frame(df).serialize()))
        for name, df in data.items()
    }
    assert have.keys() == want.keys()
    for name in want:
        assert have[name].keys() == want[name].keys(), name
        for column in want[name]:
            assert have[name][column] == want[name][column], f"{name}.{column}"
    counts = have["random"]["floats"]
    assert (counts["counts/null"], counts["counts/nan"], counts["counts/inf"]) == (300, 300, 40)
    assert have["random"]["floats"]["distribution/n"] == ROWS - 300  # infinities are kept


@pytest.mark.parametrize(
    "series",
    [
        pd.Series([1.0, np.nan, np.inf, -np.inf, None, 0.0]),
        pd.Series([np.inf] * 3, dtype=np.float32),
        pd.Series([], dtype=float),
        pd.Series([np.nan, np.nan]),
        pd.Series([1.5, None], dtype="Float64"),
        pd.Series([1, 2.5, None, math.inf, "x"], dtype=object),
        pd.Series([1, 2, None], dtype="Int64"),
        pd.Series(["a", None, "b", np.nan, np.str_("c")], index=[4, 3, 2, 1, 0], dtype=object),
        pd.Series(["a", "b"], dtype=object),
        pd.Series([None, np.nan], dtype=object),
        pd.Series(["a", 1], dtype=object),
    ],
    ids=[
        "float64",
        "float32_inf",
        "empty",
        "all_nan",
        "Float64",
        "object",
        "Int64",
        "strings_nulls",
        "strings",
        "nulls_only",
        "string_and_int",
    ],
)
def test_the_split_gives_whylogs_own_counts_and_values(series: pd.Series) -> None:
    ours, theirs = PreprocessedColumn(), PreprocessedColumn()
    whylogs_compat.split_fast(ours, series)
    whylogs_compat._whylogs_split(theirs, series)
    for key in ("null_count", "nan_count", "inf_count", "bool_count", "bool_count_where_true"):
        assert getattr(ours, key) == getattr(theirs, key), key
    for key in ("ints", "floats", "strings"):
        a, b = getattr(ours.numpy, key), getattr(theirs.numpy, key)
        assert (a is None) == (b is None), key
        if a is not None:
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype, key
    for key in ("strings", "tensors", "objs"):
        a, b = getattr(ours.pandas, key), getattr(theirs.pandas, key)
        assert (a is None) == (b is None), key
        if a is not None:
            pd.testing.assert_series_equal(a, b)


def test_the_vectorised_split_is_what_whylogs_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert whylogs_compat.patched()
    assert PreprocessedColumn._pandas_split is whylogs_compat.split_fast
    whylogs_compat.patch()  # idempotent
    assert PreprocessedColumn._pandas_split.__wrapped__ is whylogs_compat._whylogs_split

    def per_value(*args, **kwargs):
        raise AssertionError("a per-value apply ran on a float or string column")

    monkeypatch.setattr(pd.Series, "apply", per_value)
    frame = pd.DataFrame(
        {"x": [1.0, np.nan, np.inf], "y": [0.5, 2.0, -np.inf], "s": ["a", "b", "a"]}
    )  # (a string column's nulls, a few, still go through whylogs' own per-value check)
    view = why.log(pandas=frame).view()
    counts = view.get_column("x").to_summary_dict()
    assert (counts["counts/n"], counts["counts/nan"], counts["counts/inf"]) == (3, 1, 1)
    strings = view.get_column("s").to_summary_dict()
    assert (strings["counts/n"], strings["types/string"]) == (3, 3)


def test_the_numpy_2_alias_is_added_only_where_numpy_lacks_it() -> None:
    numpy_1 = types.ModuleType("numpy_1")
    numpy_1.str_, numpy_1.unicode_ = str, object  # numpy 1's own alias, whatever it is
    whylogs_compat.alias_unicode(numpy_1)
    assert numpy_1.unicode_ is object
    numpy_2 = types.ModuleType("numpy_2")
    numpy_2.str_ = str
    whylogs_compat.alias_unicode(numpy_2)
    assert numpy_2.unicode_ is str
    assert np.unicode_ is np.str_  # the installed numpy, either way


def test_whylogs_is_imported_without_scikit_learn_which_still_imports_after() -> None:
    """A fresh process: importing the compat module (so whylogs) leaves scikit-learn
    unimported and whylogs on its stubs; the hidden modules import as usual afterwards."""
    code = (
        "import sys; import fullstack_ml.runtime.whylogs_compat; import whylogs.core.stubs as s;"
        "print('sklearn' in sys.modules, s.is_not_stub(s.sklc), s.is_not_stub(s.sklp));"
        "import sklearn.cluster, sklearn.metrics.pairwise; print(sklearn.cluster.KMeans.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "KMeans"]


WITHOUT_VIZ = """
import json, sys
for name in ("IPython", "PIL", "pybars"):  # whylogs' viz extra, as a bento lacks it
    sys.modules[name] = None
import numpy as np
from fullstack_ml.runtime.drift import window_drift
rows = np.load(sys.argv[1])
scores = window_drift(rows, ["a", "b"], sys.argv[2])
print(json.dumps({k: v["pvalue"] for k, v in scores.items()}))
"""


def test_drift_scores_without_whylogs_viz_extra_equal_those_with_it(tmp_path: Path) -> None:
    """A bento installs whylogs without `viz` (IPython, Pillow: 80 MB); its drift algorithms
    import all the same and score as in a process that has them."""
    import json

    from fullstack_ml.runtime.drift import window_drift

    rng = np.random.default_rng(0)
    train = pd.DataFrame({"a": rng.normal(size=500), "b": rng.normal(size=500)})
    (tmp_path / "train.bin").write_bytes(profile_frame(train).serialize())
    rows = np.stack([rng.normal(0.3, size=300), rng.normal(size=300)], axis=1)
    np.save(tmp_path / "rows.npy", rows.astype(np.float32))
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_VIZ, tmp_path / "rows.npy", tmp_path / "train.bin"],
        capture_output=True,
        text=True,
        check=True,
    )
    here = window_drift(rows.astype(np.float32), ["a", "b"], str(tmp_path / "train.bin"))
    assert json.loads(out.stdout) == {k: v["pvalue"] for k, v in here.items()}
    assert here["a"]["pvalue"] < 0.05  # shifted: a real score, not a default
