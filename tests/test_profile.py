import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.paths import SPLITS
from fullstack_ml.runtime.drift import DatasetProfileView, load_profile, profile_frame
from fullstack_ml.stage import StageError, compose
from stages.profile import profile, profile_split
from stages.profile.batches import SetCheck, profile_splits, shared_columns

# ---------------------------------------------------------------- digits (the default data)


@pytest.fixture(scope="module")
def splits(curated: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(curated / f"{name}.parquet") for name in SPLITS}


@pytest.fixture(scope="module")
def schema(curated: Path) -> dict:
    return json.loads((curated / "schema.json").read_text())


def test_profiles_constraints_and_drift_written(
    curated: Path, splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    paths = {name: curated / f"{name}.parquet" for name in SPLITS}
    summary = profile(paths, schema, cfg.profile, tmp_path / "p")
    # per split: missing x65, range x64, classes x1; on train, val and test
    assert summary["constraints_passed"] == 3 * (65 + 64 + 1)
    for name, df in splits.items():  # every row of every split profiled
        view = load_profile(tmp_path / "p" / f"{name}.bin")
        assert view.get_column("pixel_3_3").to_summary_dict()["counts/n"] == len(df)
    drift = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert set(drift) == {"val", "test"}
    assert drift["val"]["target"]["algorithm"] == "chi-square"
    assert drift["val"]["pixel_3_3"]["algorithm"] == "ks"
    html = (tmp_path / "p" / "report.html").read_text()
    assert "pixel_3_3" in html and "<script" not in html
    constraints = json.loads((tmp_path / "p" / "constraints.json").read_text())
    assert {r["split"] for r in constraints} == set(SPLITS)
    # whylogs stamps times and a random trace id into each profile, and writes protobuf maps
    # in an order that differs between processes; these hold neither, so the same splits
    # give the same bytes in another process (a rerun writes what dvc.lock recorded)
    code = (
        "import json, sys; from pathlib import Path; from fullstack_ml.stage import compose;"
        "from stages.profile import profile; c = Path(sys.argv[1]);"
        "profile({s: c / f'{s}.parquet' for s in ('train', 'val', 'test')},"
        " json.loads((c / 'schema.json').read_text()), compose([]).profile, Path(sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", code, curated, tmp_path / "again"], check=True)
    assert 0 <= summary["outlier_rows_rate"] < 0.01 and "Outlying training rows" in html
    for name in ("train.bin", "val.bin", "test.bin", "drift.json", "report.html", "outliers.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_odd_training_rows_are_listed_first_with_the_feature_that_makes_them_odd(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    """Rows planted with ink in the top and bottom pixel rows (blank in nearly every digit)
    top the list, naming those pixels; a train split with many odd rows fails on
    profile.outliers.max_rate, one line naming the split and the rate, and writes nothing."""
    train = splits["train"].copy()
    planted = [5, 500, 1000]
    border = [f"pixel_{r}_{c}" for r in (0, 7) for c in range(8)]
    train.loc[planted, border] = 16.0
    frames = {**splits, "train": train}
    profile(frames, schema, cfg.profile, tmp_path / "p")
    found = json.loads((tmp_path / "p" / "outliers.json").read_text())
    assert found["detector"] == "ECOD" and found["rows"] == len(train)
    assert sorted(r["row"] for r in found["top"][:3]) == planted
    assert all(
        r["outlier"] and r["features"][0]["feature"] == "pixel_0_0" for r in found["top"][:3]
    )
    assert found["outliers"] >= 3 and found["rate"] == found["outliers"] / len(train)
    features = [c for c in train.columns if c != "target"]
    train.loc[: len(train) // 5, features] = 16.0 - train.loc[: len(train) // 5, features]
    strict = OmegaConf.merge(cfg.profile, {"outliers": {"max_rate": 0.01}})
    with pytest.raises(StageError, match=r"train split: \d+ of 1257 rows are outliers.*max_rate"):
        profile({**splits, "train": train}, schema, strict, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    loose = OmegaConf.merge(cfg.profile, {"outliers": {"max_rate": None}})
    profile({**splits, "train": train}, schema, loose, tmp_path / "q")  # null: not a gate


def test_an_unknown_outlier_detector_is_a_stage_error_naming_the_key(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    bad = OmegaConf.merge(
        cfg.profile, {"outliers": {"detector": {"_target_": "pyod.models.nope.X"}}}
    )
    with pytest.raises(StageError, match="profile.outliers.detector"):
        profile(splits, schema, bad, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_shifted_split_is_reported_as_drift(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    shifted = dict(splits, test=splits["test"].assign(pixel_3_3=lambda d: d.pixel_3_3 * 0.3))
    profile(shifted, schema, cfg.profile, tmp_path / "p")
    drift = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert drift["test"]["pixel_3_3"]["drift_category"] == "DRIFT"
    assert drift["val"]["pixel_3_3"]["drift_category"] != "DRIFT"


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("pixel_2_2", 99.0, r"pixel_2_2 is in range \[0,16\] \(observed \[0.0, 99.0\]\)"),
        ("pixel_2_2", np.nan, r"pixel_2_2 has no missing values \(observed 1\)"),
        ("target", 12, r"target values in the 10 known classes .*\"examples\": \[12\]"),
    ],
)
def test_violated_constraint_fails_and_writes_nothing(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path, column: str, value, message: str
) -> None:
    train = splits["train"].copy()
    train.loc[5, column] = value
    out = tmp_path / "p"
    with pytest.raises(
        StageError,
        match=f"1 of 130 profile.constraints failed on the train split, first: {message}",
    ):
        profile(dict(splits, train=train), schema, cfg.profile, out)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- mixed types


def mixed_frame(n: int, seed: int, cities: list[str] | None = None) -> pd.DataFrame:
    """A numeric feature with nulls, a nullable integer one, a categorical and string labels."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(0, 90, n)
    age[rng.random(n) < 0.1] = np.nan
    income = pd.array(rng.integers(1000, 9000, n), dtype="Int64")
    income[rng.random(n) < 0.1] = pd.NA
    label = np.where(np.nan_to_num(age, nan=50) > 45, "yes", "no")
    city = rng.choice(cities or ["a", "b", "c"], n)
    return pd.DataFrame({"age": age, "income": income, "city": city, "label": label})


MIXED_SCHEMA = {
    "source": "data/raw/x.csv",
    "task": "classification",
    "features": [
        {"name": "age", "dtype": "float64", "kind": "numeric", "nullable": True},
        {"name": "income", "dtype": "Int64", "kind": "numeric", "nullable": True},
        {
            "name": "city",
            "dtype": "object",
            "kind": "categorical",
            "nullable": False,
            "categories": ["a", "b", "c"],
        },
    ],
    "target": {"name": "label", "dtype": "object"},
    "classes": ["no", "yes"],
    "rows": {"train": 400, "val": 150, "test": 150},
}


def write_parts(df: pd.DataFrame, folder: Path, parts: int) -> Path:
    """`df` as a folder of Parquet part files, as Ray Data writes a large split."""
    folder.mkdir(parents=True)
    bounds = np.linspace(0, len(df), parts + 1).astype(int)
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        df.iloc[start:stop].to_parquet(folder / f"part-{i:03d}.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Curated mixed-type splits: train a folder of 4 part files, val and test single files."""
    root = tmp_path_factory.mktemp("mixed")
    paths = {"train": write_parts(mixed_frame(400, 0), root / "train.parquet", 4)}
    for i, name in enumerate(("val", "test"), start=1):
        mixed_frame(150, i).to_parquet(root / f"{name}.parquet", index=False)
        paths[name] = root / f"{name}.parquet"
    return paths


@pytest.fixture(scope="module")
def basic() -> DictConfig:
    """The `basic` profile config (any table), read in batches of 37 rows."""
    return compose(["profile=basic", "profile.batch_rows=37"]).profile


def with_constraints(cfg: DictConfig, **constraints) -> DictConfig:
    return OmegaConf.merge(cfg, {"constraints": constraints})


SUMMARY_KEYS = ("counts/n", "counts/null", "distribution/mean", "distribution/min")


def test_parts_profile_like_the_whole_frame(mixed: dict[str, Path]) -> None:
    parts = profile_split(mixed["train"], batch_rows=37)  # 11 batches over 4 files
    whole = profile_frame(pd.read_parquet(mixed["train"]))
    assert parts.rows == 400
    for column in ("age", "income", "city", "label"):
        got = parts.view.get_column(column).to_summary_dict()
        want = whole.get_column(column).to_summary_dict()
        for key in SUMMARY_KEYS:
            assert got[key] == pytest.approx(want[key], nan_ok=True), (column, key)
    assert parts.view.get_column("age").to_summary_dict()["counts/null"] > 0
    assert parts.view.get_column("income").to_summary_dict()["counts/null"] > 0
    for column in ("city", "label", "income"):
        items = {
            i.value: i.est
            for i in parts.view.get_column(column).to_summary_dict()[
                "frequent_items/frequent_strings"
            ]
        }
        want_items = {
            i.value: i.est
            for i in whole.get_column(column).to_summary_dict()["frequent_items/frequent_strings"]
        }
        if column != "income":  # frequent items of an int column with nulls: "1" vs "1.000000"
            assert items == want_items


def test_mixed_splits_profiled_with_report(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    summary = profile(mixed, MIXED_SCHEMA, basic, tmp_path / "p")
    assert "rows" not in summary  # schema.json has them; the metrics: headline figures
    assert summary["unseen_categories"] == {"val": {"city": 0.0}, "test": {"city": 0.0}}
    constraints = json.loads((tmp_path / "p" / "constraints.json").read_text())
    names = {r["constraint"] for r in constraints}
    assert "city has no missing values" in names and "age has no missing values" not in names
    assert "label values in the 2 known classes" in names
    assert "city values unseen in train at most 5.00% (its lower 95% bound)" in names
    drift = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert drift["val"]["city"]["algorithm"] == "chi-square"
    assert drift["val"]["label"]["algorithm"] == "chi-square"
    assert drift["val"]["age"]["algorithm"] == "ks"
    html = (tmp_path / "p" / "report.html").read_text()
    assert "<script" not in html.lower() and "http" not in html
    for split in SPLITS:
        section = html.split(f"id='split-{split}'>")[1].split("<h2")[0]
        assert f"Split {split}: " in section
        assert "<td>age</td>" in section and "<td>income</td>" in section  # numeric table
        assert "<td>city</td>" in section and "<td>label</td>" in section  # categorical table
        assert "a (" in section and "mean" in section  # top values and the distribution
    assert "Drift against train" in html and "Constraints: " in html


def test_processes_sharing_the_columns_profile_like_one(mixed: dict[str, Path]) -> None:
    """Each process profiles every row of its share of the columns; joined, the profiles
    and the set-check counts are those of one process. (Compared as summaries, frequent
    items as a set: whylogs orders items of equal count differently from run to run, and
    its KLL sketches compact at random past `KLL_K` values, so even one process does not
    give the same bytes twice on larger splits.)"""

    def summary(view: DatasetProfileView) -> dict:
        out = {}
        for column in view.get_columns():
            d = view.get_column(column).to_summary_dict()
            items = d.pop("frequent_items/frequent_strings", [])
            d = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in d.items()}
            out[column] = {**d, "items": {(i.value, i.est) for i in items}}
        return out

    assert shared_columns(mixed) == ["age", "income", "city", "label"]
    checks = [SetCheck("city", ("a", "b")), SetCheck("label", ("no",))]
    one = profile_splits(mixed, checks, batch_rows=37, processes=1)
    assert one["train"].counts[checks[0].key]["outside"] > 0  # the c's
    for processes in (2, 3):
        many = profile_splits(mixed, checks, batch_rows=37, processes=processes)
        for name in SPLITS:
            assert many[name].rows == one[name].rows
            assert many[name].counts == one[name].counts
            assert list(many[name].view.get_columns()) == shared_columns(mixed)
            assert summary(many[name].view) == summary(one[name].view)


def test_processes_key_is_checked(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    for bad in (0, "two"):
        cfg = OmegaConf.merge(basic, {"processes": bad})
        with pytest.raises(StageError, match=r"^profile.processes: .* is not a number >= 1"):
            profile(mixed, MIXED_SCHEMA, cfg, tmp_path / "p")
        assert not (tmp_path / "p").exists()


@pytest.mark.usefixtures("ray_local")
def test_ray_engine_profiles_the_parts(mixed: dict[str, Path]) -> None:
    local = profile_split(mixed["train"], batch_rows=64)
    ray = profile_split(mixed["train"], batch_rows=64, engine="ray")
    assert ray.rows == local.rows == 400
    for column in ("age", "income", "city", "label"):
        got = ray.view.get_column(column).to_summary_dict()
        want = local.view.get_column(column).to_summary_dict()
        for key in SUMMARY_KEYS:
            assert got[key] == pytest.approx(want[key], nan_ok=True), (column, key)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (
            {"column": "age", "check": "in_range", "min": 0, "max": 50},
            r"first: age is in range \[0,50\] \(observed \[0\.\d+, 8\d\.\d+\]\)",
        ),
        (
            {"column": "income", "check": "mean_between", "min": 0, "max": 10},
            r"income mean between 0 and 10 \(inclusive\) \(observed 5\d\d\d\.\d+\)",
        ),
        (
            {"column": "city", "check": "in_set", "values": ["a", "b"]},
            r"city values in \{a, b\} \(observed \{\"outside\": 1\d\d, \"rate\": 0\.\d+, "
            r"\"examples\": \[\"c\"\]\}\)",
        ),
        ({"column": "age", "check": "no_missing"}, r"age has no missing values \(observed \d+\)"),
    ],
)
def test_declared_constraint_failure_names_it_and_the_observed_value(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path, declared: dict, message: str
) -> None:
    cfg = with_constraints(basic, declared=[declared])
    with pytest.raises(StageError, match=message) as err:
        profile(mixed, MIXED_SCHEMA, cfg, tmp_path / "p")
    assert "profile.constraints failed on the train split (also 1 on val, 1 on test)" in str(
        err.value
    )
    assert not (tmp_path / "p").exists()


def test_declared_constraints_that_hold_pass(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    declared = [
        {"column": "age", "check": "in_range", "min": 0, "max": 120},
        {"column": "income", "check": "mean_between", "min": 1000, "max": 9000},
        {"column": "city", "check": "in_set", "values": ["a", "b", "c", "d"]},
        {"column": "label", "check": "no_missing"},
    ]
    cfg = with_constraints(basic, declared=declared, splits=["train"])
    profile(mixed, MIXED_SCHEMA, cfg, tmp_path / "p")
    report = json.loads((tmp_path / "p" / "constraints.json").read_text())
    mine = [r for r in report if r["source"].startswith("profile.constraints.declared")]
    assert len(mine) == 3 and all(r["passed"] for r in mine)  # + label: no_missing_values
    assert [r["constraint"] for r in report].count("label has no missing values") == 1
    assert {r["split"] for r in report} == {"train"}


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"column": "age", "check": "between", "min": 0, "max": 1}, r"unknown check 'between'"),
        ({"column": "height", "check": "no_missing"}, r"unknown column 'height'"),
        ({"column": "city", "check": "in_range", "min": 0, "max": 1}, r"needs a numeric column"),
        ({"column": "age", "check": "in_range", "min": 0}, r"missing \['max'\]"),
        ({"column": "city", "check": "in_set", "value": ["a"]}, r"unknown \['value'\]"),
    ],
)
def test_bad_declared_constraint_is_a_stage_error_naming_it(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path, declared: dict, message: str
) -> None:
    ok = {"column": "age", "check": "no_missing"}
    cfg = with_constraints(basic, declared=[ok, declared])
    with pytest.raises(StageError, match=rf"^profile\.constraints\.declared\[1\]: .*{message}"):
        profile(mixed, MIXED_SCHEMA, cfg, tmp_path / "p")


def test_two_unseen_categories_in_a_small_split_are_no_evidence_of_a_rate_over_the_limit(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    val = mixed_frame(30, 1)
    val.loc[val.index[:2], "city"] = "zz"  # 6.7% > 5%: one row short of passing as it is
    profile(dict(mixed, val=val), MIXED_SCHEMA, basic, tmp_path / "p")
    constraints = json.loads((tmp_path / "p" / "constraints.json").read_text())
    (unseen,) = [c for c in constraints if c["split"] == "val" and "unseen" in c["constraint"]]
    assert unseen["passed"] and unseen["observed"]["outside"] == 2


def test_unknown_categories_in_val_fail_naming_column_and_rate(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    val = mixed_frame(150, 1, cities=["a", "b", "c", "zz", "yy"])  # ~40% unseen
    splits = dict(mixed, val=val)
    with pytest.raises(StageError) as err:
        profile(splits, MIXED_SCHEMA, basic, tmp_path / "p")
    msg = str(err.value)
    assert "1 of " in msg and "failed on the val split, first: city values unseen in train" in msg
    rate = json.loads(msg.split("(observed ")[1].rstrip(")"))["rate"]
    assert 0.3 < rate < 0.5
    # with no limit it passes, and the rate is reported
    profile(splits, MIXED_SCHEMA, with_constraints(basic, max_unknown_categories=None), tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert f"{rate:.2%}" in html


def test_null_in_a_non_nullable_column_fails_on_its_split(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    test = mixed_frame(150, 2).astype({"city": object})
    test.loc[[3, 7], "city"] = None
    with pytest.raises(StageError, match=r"failed on the test split, first: city has no missing"):
        profile(dict(mixed, test=test), MIXED_SCHEMA, basic, tmp_path / "p")


def test_regression_target_and_missing_split(
    mixed: dict[str, Path], basic: DictConfig, tmp_path: Path
) -> None:
    frames = {
        s: pd.read_parquet(p).assign(label=lambda d: d.age.fillna(0) * 2) for s, p in mixed.items()
    }
    schema = {**MIXED_SCHEMA, "task": "regression", "classes": [], "target": {"name": "label"}}
    profile(frames, schema, basic, tmp_path / "p")
    drift = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert drift["val"]["label"]["algorithm"] == "ks"
    with pytest.raises(StageError, match=r"nowhere\.parquet: not found"):
        profile(dict(mixed, val=tmp_path / "nowhere.parquet"), schema, basic, tmp_path / "q")


def test_part_with_an_all_null_column_merges(tmp_path: Path) -> None:
    folder = tmp_path / "train.parquet"
    write_parts(mixed_frame(60, 0).assign(city=None), folder, 1)  # city: Parquet type null
    mixed_frame(60, 1).to_parquet(folder / "part-001.parquet", index=False)
    (folder / "_SUCCESS").touch()  # as Spark and Hadoop writers leave it
    city = profile_split(folder, batch_rows=25).view.get_column("city").to_summary_dict()
    assert (city["counts/n"], city["counts/null"], city["types/string"]) == (120, 60, 60)


HELPER = """
import os
from fullstack_ml.runtime.drift_pool import helper_pool
print(helper_pool().submit(os.getpid).result(), flush=True)
os._exit(0)  # as a SIGKILLed worker: no shutdown of the pool
"""


def test_the_drift_helper_exits_when_the_process_that_started_it_dies() -> None:
    import psutil

    out = subprocess.run([sys.executable, "-c", HELPER], capture_output=True, text=True)
    helper = int(out.stdout)
    deadline = time.monotonic() + 60  # it looks once a second; an orphan never goes
    while time.monotonic() < deadline:
        try:
            if psutil.Process(helper).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the helper {helper} outlived its parent")
