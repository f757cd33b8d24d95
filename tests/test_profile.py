import json
import re
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


def outside_links(page: str) -> list[str]:
    """The page's sources and links that are neither inline (data:) nor on the page (#)."""
    links = re.findall(r"""(?:src|href)=["']([^"']*)""", page) + re.findall(r"url\(", page)
    return [link for link in links if not link.startswith(("data:", "#"))]


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
    assert "<script" not in html.lower() and not outside_links(html)
    assert "Content-Security-Policy" in html.split("</head>")[0]
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


# ---------------------------------------------------------------- images (data=digits_images)


def test_image_statistics_are_pillows_hsv_per_image_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runtime.images.image_stats (the service computes them too): brightness, saturation
    and hue within 1 of Pillow's HSV, sharpness the mean step between neighbours; whatever
    the images per chunk."""
    from PIL import Image

    import fullstack_ml.runtime.images as runtime_images
    from fullstack_ml.runtime.images import STATS, image_stats, stat_columns

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 12, 10, 3), dtype=np.uint8)
    rgb[0] = 128  # grey: no hue, no saturation
    rgb[1] = (255, 0, 0)  # red
    rgb[2] = (0, 0, 255)  # blue: hue 170 of 255
    got = image_stats(rgb)
    assert list(got) == list(STATS["RGB"]) and all(v.dtype == np.float64 for v in got.values())
    for i, img in enumerate(rgb):
        hsv = np.asarray(Image.fromarray(img).convert("HSV"), dtype=np.float64).reshape(-1, 3)
        for k, name in enumerate(("hue", "saturation", "brightness")):
            assert got[f"{name}_mean"][i] == pytest.approx(hsv[:, k].mean(), abs=1), (i, name)
            assert got[f"{name}_std"][i] == pytest.approx(hsv[:, k].std(), abs=1), (i, name)
    assert got["hue_mean"][2] == pytest.approx(170, abs=1) and got["saturation_mean"][0] == 0
    grey = np.zeros((2, 4, 4, 1), np.uint8)
    grey[1, :, ::2] = 200  # stripes: each step across is 200, none down
    stats = image_stats(grey)
    assert list(stats) == list(STATS["L"]) == ["brightness_mean", "brightness_std", "sharpness"]
    assert stats["brightness_mean"].tolist() == [0, 100] and stats["brightness_std"][1] == 100
    assert stats["sharpness"].tolist() == [0, 200 * 12 / 24]  # 12 of 24 neighbour pairs
    monkeypatch.setattr(runtime_images, "STATS_CHUNK_PIXELS", 250)  # 2 images a chunk
    for name, values in image_stats(rgb).items():
        assert np.array_equal(values, got[name]), name
    assert stat_columns("photo", "RGB")[:2] == ["photo.brightness_mean", "photo.brightness_std"]
    with pytest.raises(ValueError, match=r"not uint8 \(N, H, W, 1 or 3\)"):
        image_stats(rgb[..., :2])


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict]:
    """data=digits_images ingested (1797 16x16 grey PNGs): the splits' paths, the schema."""
    from stages.ingest import ingest

    out = tmp_path_factory.mktemp("digit-images")
    schema = ingest(compose(["data=digits_images"]).data, 42, out)
    return {s: out / f"{s}.parquet" for s in SPLITS}, schema


@pytest.fixture(scope="module")
def images_cfg() -> DictConfig:
    return compose(["data=digits_images"]).profile


def png_pixels(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img)


def test_an_image_set_is_profiled_by_its_statistics_with_classes_and_thumbnails(
    digit_images: tuple[dict[str, Path], dict], images_cfg: DictConfig, tmp_path: Path
) -> None:
    """The profiles hold each image's statistics as numeric columns (what the served drift
    monitor compares against train.bin); drift scores them, not the column of PNG bytes;
    classes.json counts each class exactly; report.html shows 5 thumbnails a class and the
    10 oddest training images inline, as PNG data URIs its CSP allows; a rerun writes the
    same bytes."""
    import base64

    paths, schema = digit_images
    summary = profile(paths, schema, images_cfg, tmp_path / "p")
    stats = ["image.brightness_mean", "image.brightness_std", "image.sharpness"]
    frames = {s: pd.read_parquet(p) for s, p in paths.items()}
    train = load_profile(tmp_path / "p/train.bin")
    assert list(train.get_columns()) == ["image", *stats, "label"]  # no path, no sha256
    for column in stats:
        assert train.get_column(column).to_summary_dict()["counts/n"] == 1257
    brightness = train.get_column("image.brightness_mean").to_summary_dict()
    pixels = np.stack([png_pixels(b) for b in frames["train"]["image"]])
    assert brightness["distribution/mean"] == pytest.approx(pixels.mean(), rel=1e-6)
    drift = json.loads((tmp_path / "p/drift.json").read_text())
    assert list(drift["val"]) == ["label", *stats]  # the PNG bytes' column is not scored
    assert {drift["test"][c]["algorithm"] for c in stats} == {"ks"}
    assert summary["drifted_columns"] == {"val": 0, "test": 0}
    classes = json.loads((tmp_path / "p/classes.json").read_text())
    for split, frame in frames.items():
        assert classes[split] == frame["label"].value_counts().sort_index().to_dict()
    constraints = json.loads((tmp_path / "p/constraints.json").read_text())
    assert {r["constraint"] for r in constraints if r["passed"]} >= {"image has no missing values"}
    outliers = json.loads((tmp_path / "p/outliers.json").read_text())
    assert outliers["rows"] == 1257 and outliers["top"][0]["features"][0]["feature"] in stats
    facts = json.loads((tmp_path / "p/images.json").read_text())
    samples = facts["features"]["image"]["samples"]
    assert list(samples) == [str(d) for d in range(10)]
    first = frames["train"].groupby("label", sort=True).head(5)  # train's first, in order
    for label, group in first.groupby("label"):
        assert [base64.b64decode(s) for s in samples[label]] == list(group["image"])
    assert [r["row"] for r in facts["oddest"]] == [r["row"] for r in outliers["top"]]
    assert facts["oddest"][0]["path"] == frames["train"]["path"][facts["oddest"][0]["row"]]
    page = (tmp_path / "p/report.html").read_text()
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert page.count("<img") == len(sources) == 10 * 5 + 10
    assert all(png_pixels(base64.b64decode(s)).shape == (16, 16) for s in sources)
    assert "img-src data:" in page.split("</head>")[0] and not outside_links(page)
    assert "Classes: 10" in page and "Files rejected by ingest: none" in page
    assert "<td>image.brightness_mean</td>" in page  # a numeric column of each split
    profile(paths, schema, images_cfg, tmp_path / "again")
    for name in ("train.bin", "drift.json", "images.json", "classes.json", "report.html"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_inverted_val_images_drift_on_brightness(
    digit_images: tuple[dict[str, Path], dict], images_cfg: DictConfig, tmp_path: Path
) -> None:
    """White digits on black in train, black on white in val: val drifts on its brightness
    (KS on the statistic), test does not; a declared check on a statistic holds it to a
    range, naming it."""
    import io

    from PIL import Image

    def inverted(data: bytes) -> bytes:
        out = io.BytesIO()
        Image.fromarray(255 - png_pixels(data)).save(out, "PNG")
        return out.getvalue()

    paths, schema = digit_images
    frames = {s: pd.read_parquet(p) for s, p in paths.items()}
    val = frames["val"].assign(image=frames["val"]["image"].map(inverted))
    val = val.drop(columns=[c for c in val if c.startswith("image.")])  # ingest's, of before
    profile({**frames, "val": val}, schema, images_cfg, tmp_path / "p")
    drift = json.loads((tmp_path / "p/drift.json").read_text())
    assert drift["val"]["image.brightness_mean"]["drift_category"] == "DRIFT"
    assert drift["test"]["image.brightness_mean"]["drift_category"] == "NO_DRIFT"
    assert drift["val"]["label"]["drift_category"] == "NO_DRIFT"
    page = (tmp_path / "p/report.html").read_text()
    assert "image.brightness_mean" in page.split("Drifted features")[1].split("</p>")[0]
    dark = {"column": "image.brightness_mean", "check": "mean_between", "min": 0, "max": 128}
    cfg = with_constraints(images_cfg, declared=[dark])
    with pytest.raises(StageError, match=r"failed on the val split, first: image.brightness_mean"):
        profile({**frames, "val": val}, schema, cfg, tmp_path / "q")


def test_a_bad_image_in_a_curated_split_names_the_split_column_and_row(
    digit_images: tuple[dict[str, Path], dict], images_cfg: DictConfig, tmp_path: Path
) -> None:
    """A split whose statistics are not ingest's (a table of images made elsewhere) is
    decoded; a value that is no image is named."""
    paths, schema = digit_images
    test = pd.read_parquet(paths["test"])
    test = test.drop(columns=[c for c in test if c.startswith("image.")])
    test.loc[3, "image"] = b"not a picture"
    with pytest.raises(StageError, match=r"^test split: column 'image', row 3: not an image"):
        profile({**paths, "test": test}, schema, images_cfg, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_processes_sharing_an_image_sets_columns_profile_like_one(
    digit_images: tuple[dict[str, Path], dict],
) -> None:
    """The image column and its statistics go to one process, in one column order."""
    from fullstack_ml.schema import parse_schema

    paths, schema = digit_images
    images = parse_schema(schema).images
    one = profile_splits(paths, batch_rows=500, processes=1, images=images)
    two = profile_splits(paths, batch_rows=500, processes=2, images=images)
    for name in SPLITS:
        assert list(two[name].view.get_columns()) == list(one[name].view.get_columns())
        for column in ("image.sharpness", "label"):
            got = two[name].view.get_column(column).to_summary_dict()
            want = one[name].view.get_column(column).to_summary_dict()
            assert got["counts/n"] == want["counts/n"] == one[name].rows
            assert got.get("distribution/mean") == want.get("distribution/mean")


def test_rejected_files_of_a_colour_set_are_counted_by_reason_and_listed(tmp_path: Path) -> None:
    """An RGB set with bad files and a duplicate, ingested with data.bad_files=drop: the
    profile has hue and saturation too; rejected.csv's files are counted by reason (not by
    their particulars) and listed in the report."""
    from test_images import encoded, shapes
    from test_ingest import image_set, images_cfg

    from stages.ingest import ingest

    root = image_set(tmp_path / "set", per_class=6)
    (root / "star/zero.png").write_bytes(b"")
    (root / "star/notes.png").write_bytes(b"text")
    whole = encoded(shapes(7), "PNG")
    (root / "circle/cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "square/again.png").write_bytes((root / "square/square_00.png").read_bytes())
    drop = images_cfg(root, "data.bad_files=drop", "data.image.max_bad_rate=0.5")
    schema = ingest(drop, 0, tmp_path / "c")
    paths = {s: tmp_path / "c" / f"{s}.parquet" for s in SPLITS}
    cfg = compose(["data=images"]).profile
    profile(paths, schema, cfg, tmp_path / "p", rejected=tmp_path / "c/rejected.csv")
    train = load_profile(tmp_path / "p/train.bin")
    assert {"image.hue_mean", "image.saturation_std"} <= set(train.get_columns())
    rejected = json.loads((tmp_path / "p/images.json").read_text())["rejected"]
    assert rejected["files"] == 4 and rejected["kinds"] == {
        "empty file": 1,
        "not an image": 1,
        "truncated or corrupt": 1,
        "duplicate": 1,
    }
    page = (tmp_path / "p/report.html").read_text()
    assert "Files rejected by ingest: 4" in page and "circle/cut.png" in page
    train_rows = json.loads((tmp_path / "p/classes.json").read_text())["train"]
    oddest = json.loads((tmp_path / "p/outliers.json").read_text())["top"]
    assert page.count("<img") == sum(min(n, 5) for n in train_rows.values()) + len(oddest)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("duplicate of square/again.png", "duplicate"),
        ("near-duplicate of train's a/0.png", "near-duplicate of a train image"),
        (
            "9000x9000 is 81,000,000 pixels, over data.image.max_pixels 50,000,000 (read",
            "over data.image.max_pixels",
        ),
        ("4x4: under data.image.min_size 8", "under data.image.min_size"),
        ("animated (3 frames); data.image.animated=first takes one", "animated"),
        ("truncated or corrupt: image file is truncated", "truncated or corrupt"),
        ("not an image (none of PNG, JPEG)", "not an image"),
    ],
)
def test_rejected_files_are_counted_by_the_kind_of_their_reason(reason: str, kind: str) -> None:
    from fullstack_ml.images import rejection_kind

    assert rejection_kind(reason) == kind
