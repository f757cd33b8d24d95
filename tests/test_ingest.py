import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig
from servers import S3Server, s3_env

from fullstack_ml import ray_session
from fullstack_ml.gates import rate_bounds
from fullstack_ml.stage import StageError, compose
from stages.ingest import ingest
from stages.ingest.gates import unknown_gate
from stages.ingest.split import split_table


def file_cfg(path: Path, *overrides: str) -> DictConfig:
    """conf/data/file.yaml pointed at `path`, with small splits."""
    base = ["data=file", f"data.path={path}", "data.split.val_size=0.2", "data.split.test_size=0.2"]
    return compose([*base, *overrides]).data


def mixed_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Numbers with gaps, a text category with gaps, a boolean, a time, groups, labels."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "age": rng.normal(40, 10, n).round(1),
            "city": rng.choice(["paris", "rome", "oslo"], n),
            "member": rng.choice([True, False], n),
            "day": pd.date_range("2026-01-01", periods=n, freq="h"),
            "shop": rng.integers(0, 20, n),
            "spend": rng.gamma(2.0, 30.0, n).round(2),
        }
    )
    df.loc[rng.random(n) < 0.1, "age"] = np.nan
    df.loc[rng.random(n) < 0.05, "city"] = None
    df["label"] = np.where(df.spend > 60, "high", "low")
    return df


def test_digits_splits_are_typed_stratified_and_complete(curated: Path) -> None:
    parts = {n: pd.read_parquet(curated / f"{n}.parquet") for n in ("train", "val", "test")}
    schema = json.loads((curated / "schema.json").read_text())
    assert sum(len(p) for p in parts.values()) == 1797
    assert len(schema["features"]) == 64 and schema["classes"] == list(range(10))
    assert schema["task"] == "classification" and schema["columns"]["pixel_3_3"] == "number"
    assert {f["kind"] for f in schema["features"]} == {"numeric"}
    assert schema["target"] == {"name": "target", "dtype": "int64"}
    for part in parts.values():
        assert list(part.columns) == [f["name"] for f in schema["features"]] + ["target"]
        assert part["pixel_3_3"].dtype == "float64"
        # stratified: every class present with roughly its overall share (about 10%)
        shares = part["target"].value_counts(normalize=True)
        assert set(shares.index) == set(range(10)) and shares.max() < 0.13


def test_mixed_types_are_inferred_and_kept_raw(tmp_path: Path) -> None:
    src = tmp_path / "shop.parquet"
    mixed_frame().to_parquet(src)
    schema = ingest(file_cfg(src, "data.split.column=day"), 0, tmp_path / "out")
    kinds = {f["name"]: f["kind"] for f in schema["features"]}
    assert kinds == {
        "age": "numeric",
        "city": "categorical",
        "member": "categorical",
        "shop": "numeric",
        "spend": "numeric",
    }
    assert schema["task"] == "classification" and schema["classes"] == ["high", "low"]
    city = next(f for f in schema["features"] if f["name"] == "city")
    assert city["categories"] == ["oslo", "paris", "rome"] and city["nullable"]
    train = pd.read_parquet(tmp_path / "out/train.parquet")
    assert train.age.isna().any() and train.city.isna().any()  # imputation happens in train
    assert set(train.member.unique()) == {"True", "False"}
    assert "day" in train.columns  # the split column is kept, but it is not a feature


def test_regression_is_inferred_from_a_numeric_target(tmp_path: Path) -> None:
    src = tmp_path / "shop.csv"
    mixed_frame().drop(columns="label").to_csv(src, index=False)
    schema = ingest(
        file_cfg(src, "data.target=spend", "data.split.strategy=stratified"), 0, tmp_path / "o"
    )
    assert schema["task"] == "regression" and schema["classes"] == []
    assert schema["columns"]["day"] == "datetime"  # parsed from the CSV's ISO timestamps
    cfg = file_cfg(
        src, "data.target=spend", "data.task=classification", "data.columns={day: datetime}"
    )
    with pytest.raises(StageError, match="data.split: cannot split"):
        ingest(cfg, 0, tmp_path / "o")  # 60%+ of the amounts occur once: not classes


def test_declared_schema_fails_or_drops_unparseable_values(tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    df = mixed_frame(100)
    df["shop"] = df["shop"].astype(str)
    df.loc[[3, 7], "shop"] = "n/a?"
    df.to_csv(src, index=False)
    declare = "data.columns={shop: integer, day: datetime}"
    with pytest.raises(
        StageError, match=r"column 'shop': 2 values are not integer \(first: 'n/a\?'\)"
    ):
        ingest(file_cfg(src, declare), 0, tmp_path / "out")
    schema = ingest(file_cfg(src, declare, "data.bad_rows=drop"), 0, tmp_path / "out")
    assert schema["dropped_rows"] == 2 and sum(schema["rows"].values()) == 98
    assert schema["columns"]["day"] == "datetime"
    with pytest.raises(StageError, match="column 'price' declared in data.columns is missing"):
        ingest(file_cfg(src, "data.columns={price: number}"), 0, tmp_path / "out")
    with pytest.raises(StageError, match=r"data.columns.shop: unknown type 'int'"):
        ingest(file_cfg(src, "data.columns={shop: int}"), 0, tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "overrides", "message"),
    [
        (lambda d: pd.concat([d, d.head(40)]), [], r"40 duplicate rows \(9\.1%\) exceed"),
        (lambda d: d.assign(grade=d.label.map({"high": 1, "low": 0})), [], "'grade' is a copy"),
        (lambda d: d.assign(label=None), ["data.bad_rows=fail"], "has 400 missing values"),
        (lambda d: d, ["data.features=[age,nope]"], r"feature column 'nope' \(data.features\)"),
        (lambda d: d, ["data.categorical=[age,label]"], "'label' is not a feature column"),
        (lambda d: d, ["data.features=[age,day]"], "'day' is datetime"),
        (lambda d: d, ["data.target=nope"], "target column 'nope' not found"),
        (lambda d: d, ["data.split.strategy=group"], r"data.split.column: None"),
        (lambda d: d, ["data.split.strategy=alphabetical"], "not random | stratified"),
        (lambda d: d, ["data.task=regression"], "'label' is object, not numeric"),
        (lambda d: d.assign(label="low"), [], "'label' has 1 class: a classifier needs two"),
        (lambda d: d.assign(label=1), ["data.task=classification"], "has 1 class"),
    ],
)
def test_quality_gates_and_config_errors_name_the_problem(
    tmp_path: Path, change, overrides: list[str], message: str
) -> None:
    src = tmp_path / "t.parquet"
    change(mixed_frame()).to_parquet(src)
    with pytest.raises(StageError, match=message):
        ingest(file_cfg(src, *overrides), 0, tmp_path / "out")


def test_a_number_column_with_some_text_names_the_column_count_and_value(
    tmp_path: Path,
) -> None:
    """Read as text, it would become a category and fail an unrelated gate (unseen values)."""
    df = mixed_frame()
    df["spend"] = df["spend"].astype(str)
    df.loc[[5, 9, 11], "spend"] = ["unknown", "?", "unknown"]
    src = tmp_path / "t.parquet"
    df.to_parquet(src)
    with pytest.raises(
        StageError,
        match=r"column 'spend' holds numbers but 3 values are not \(first: 'unknown'\): "
        r"declare it in data.columns as number",
    ):
        ingest(file_cfg(src), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    drop = ingest(
        file_cfg(src, "data.columns={spend: number}", "data.bad_rows=drop"), 0, tmp_path / "out"
    )
    assert drop["dropped_rows"] == 3 and drop["columns"]["spend"] == "number"
    keep = ["data.columns={spend: string}", "data.quality.max_unknown_categories=1.0"]
    assert ingest(file_cfg(src, *keep), 0, tmp_path / "out")["columns"]["spend"] == "string"
    df["shop"] = df["shop"].astype(str).where(df.index != 3, "n/a")  # 20 codes: a category
    df.to_parquet(src)
    ingest(file_cfg(src, "data.columns={spend: number}", "data.bad_rows=drop"), 0, tmp_path / "out")


def test_unknown_categories_in_val_fail_past_the_threshold(tmp_path: Path) -> None:
    df = mixed_frame(300)
    df["city"] = [f"c{i}" for i in range(300)]  # every value unique: all unseen in train
    src = tmp_path / "t.parquet"
    df.to_parquet(src)
    with pytest.raises(StageError, match=r"split, column 'city': 100\.0% of values are categories"):
        ingest(file_cfg(src), 0, tmp_path / "out")
    ingest(file_cfg(src, "data.quality.max_unknown_categories=1.0"), 0, tmp_path / "out")


def test_unseen_categories_fail_on_evidence_not_on_two_rows_of_a_small_split() -> None:
    unknown_gate("val", "city", 2, 27, 0.05)  # 7.4%, but no evidence of more than 5%
    with pytest.raises(StageError, match=r"^val split, column 'city': 18\.5% .*at least 7\.6%"):
        unknown_gate("val", "city", 5, 27, 0.05)


SPLIT = {"val_size": 0.2, "test_size": 0.2, "column": None}


def test_random_and_stratified_splits_are_seeded() -> None:
    df = pd.DataFrame({"x": range(100), "y": [0, 1, 1, 1] * 25})
    strat = {**SPLIT, "strategy": "stratified"}
    a = split_table(df, "y", strat, 1, "classification")
    assert a["test"].equals(split_table(df, "y", strat, 1, "classification")["test"])
    assert not a["test"].equals(split_table(df, "y", strat, 2, "classification")["test"])
    assert all(p.y.mean() == 0.75 for p in a.values())  # class shares kept exactly
    rand = split_table(df, "y", {**SPLIT, "strategy": "random"}, 1, "classification")
    assert sorted(pd.concat(rand.values()).x) == list(range(100))


def test_time_split_puts_the_newest_rows_in_test() -> None:
    df = pd.DataFrame({"t": pd.date_range("2026-01-01", periods=50, freq="D"), "y": 0})
    df = df.sample(frac=1, random_state=0)  # shuffled on disk
    parts = split_table(df, "y", {**SPLIT, "strategy": "time", "column": "t"}, 0, "regression")
    assert (
        parts["train"].t.max()
        < parts["val"].t.min()
        <= parts["val"].t.max()
        < parts["test"].t.min()
    )
    assert [len(p) for p in parts.values()] == [30, 10, 10]


def test_group_split_keeps_each_group_in_one_split() -> None:
    df = pd.DataFrame({"g": np.repeat(np.arange(40), 5), "y": np.arange(200) % 2})
    parts = split_table(df, "y", {**SPLIT, "strategy": "group", "column": "g"}, 3, "classification")
    groups = [set(p.g) for p in parts.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(len(p) for p in parts.values()) == 200
    assert 25 <= len(parts["test"]) <= 45  # whole groups: about test_size of the rows


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "empty file"),
        ("a,label\n", "no data rows"),
        ("a,label\n1,x\n2,y,3\n", "line 3: expected 2 fields, found 3"),
    ],
)
def test_bad_file_fails_and_keeps_previous_output(
    tmp_path: Path, curated: Path, content: str | None, message: str
) -> None:
    src = tmp_path / "bad.csv"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes((curated / "train.parquet").read_bytes())
    with pytest.raises(StageError, match=message) as err:
        ingest(file_cfg(src), 0, out)
    assert str(src) in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary output left behind"


def test_unsplittable_data_names_the_split(tmp_path: Path) -> None:
    src = tmp_path / "tiny.csv"
    pd.DataFrame({"a": range(6), "label": [0, 0, 0, 0, 0, 1]}).to_csv(src, index=False)
    with pytest.raises(StageError, match="data.split: cannot split 6 rows"):
        ingest(file_cfg(src), 0, tmp_path / "out")


def test_stage_cli_reports_one_line_and_exit_status(tmp_path: Path, in_repo_root: Path) -> None:
    missing = tmp_path / "missing.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "data=file", f"data.path={missing}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {missing}") and "not found" in lines[0]


@pytest.mark.usefixtures("ray_local")
def test_ray_engine_streams_the_same_rows_into_part_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "shop.csv"
    mixed_frame(3000).to_csv(src, index=False)
    monkeypatch.setattr(
        "fullstack_ml.ray_source.BLOCK_BYTES", 20_000
    )  # cut the CSV into ~10 ranges
    by_group = ["data.split.strategy=group", "data.split.column=shop"]
    pandas = ingest(file_cfg(src, *by_group), 0, tmp_path / "pandas")
    with ray_session.session():  # the session's Ray (ray_local), or one of its own
        ray = ingest(file_cfg(src, *by_group, "data.engine=ray"), 0, tmp_path / "ray")
        # parts are named by their rows, not by a random id: a rerun writes the same files
        ingest(file_cfg(src, *by_group, "data.engine=ray"), 0, tmp_path / "again")
    assert (tmp_path / "ray/train.parquet").is_dir()  # partitioned: Parquet parts
    for key in ("task", "classes", "columns"):
        assert ray[key] == pandas[key], key
    assert [(f["name"], f["kind"]) for f in ray["features"]] == [
        (f["name"], f["kind"]) for f in pandas["features"]
    ]
    assert set(ray) == set(pandas)  # one schema builder: the same keys from both engines
    assert [set(f) for f in ray["features"]] == [set(f) for f in pandas["features"]]
    for split in ("train", "val", "test"):
        files = sorted(p.name for p in (tmp_path / f"ray/{split}.parquet").iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"again/{split}.parquet").iterdir())
    parts = {s: pd.read_parquet(tmp_path / f"ray/{s}.parquet") for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in parts.items()} == ray["rows"]
    groups = [set(p.shop) for p in parts.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])

    def rows(frames: list[pd.DataFrame]) -> pd.DataFrame:
        whole = pd.concat(frames)
        return whole.sort_values(list(whole.columns)).reset_index(drop=True)

    expected = [pd.read_parquet(tmp_path / f"pandas/{s}.parquet") for s in parts]
    pd.testing.assert_frame_equal(rows(list(parts.values())), rows(expected), check_dtype=False)


@pytest.mark.usefixtures("ray_local")
def test_ray_engine_fails_with_the_same_one_line_errors(tmp_path: Path) -> None:
    df = mixed_frame(500)
    df["shop"] = df["shop"].astype(str)
    df.loc[7, "shop"] = "n/a?"
    src = tmp_path / "t.csv"
    df.assign(copy=df.label).to_csv(src, index=False)
    out = tmp_path / "out"
    cases = [
        (["data.columns={shop: integer}"], r"column 'shop': 1 values are not integer"),
        (["data.bad_rows=drop"], "feature 'copy' is a copy of the target 'label'"),
    ]
    with ray_session.session():  # the session's Ray (ray_local), or one of its own
        for overrides, message in cases:
            with pytest.raises(StageError, match=message) as err:
                ingest(file_cfg(src, "data.engine=ray", *overrides), 0, out)
            assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
            assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_duplicate_rows_counts_as_pandas_duplicated_does() -> None:
    """The hashed count equals `DataFrame.duplicated` where equality is subtle: -0.0 and
    0.0, NaNs of other bit patterns, None / NaN / pd.NA in strings, and hash-free rows."""
    from stages.ingest.gates import duplicate_rows

    rng = np.random.default_rng(3)
    other_nan = np.array([0x7FF8000000000001], dtype=np.uint64).view(np.float64)[0]
    base = pd.DataFrame(
        {
            "x": rng.choice([0.0, -0.0, 1.5, np.nan, other_nan], size=400),
            "y": rng.integers(0, 3, size=400),
            "s": pd.array(rng.choice(["a", "b", None], size=400), dtype="string"),
            "o": rng.choice(np.array(["u", None, np.nan], dtype=object), size=400),
        }
    )
    for df in (base, base.drop_duplicates(), base.iloc[::-1], base.head(0)):
        assert duplicate_rows(df) == int(df.duplicated().sum())
        codes = {c: pd.factorize(df[c]) for c in ("s", "o")}  # as ingest passes them
        assert duplicate_rows(df, codes) == int(df.duplicated().sum())
    assert duplicate_rows(base) > 0 and duplicate_rows(base.drop_duplicates()) == 0


def test_unseen_categories_from_codes_match_the_values() -> None:
    """The train vocabulary and unseen rates from factorized codes are those of the values:
    `unique` of train's non-null values in order, the share of val's non-null values not in
    it; nulls are neither."""
    from stages.ingest.gates import check_unknown_categories

    rng = np.random.default_rng(5)
    values = rng.choice(np.array(["d", "a", None, "c", "b", np.nan], dtype=object), size=300)
    column = pd.Series(values)
    idx = [np.arange(0, 200), np.arange(200, 300), np.arange(200, 300)]
    column.iloc[:200] = column.iloc[:200].replace("b", "a")  # "b" only in val and test
    codes = {"s": pd.factorize(column)}
    train, val = column.iloc[idx[0]].dropna(), column.iloc[idx[1]].dropna()
    unseen = int((~val.isin(train.unique())).sum())
    assert 0 < unseen < len(val)
    # the gate fails past the rate's lower bound, which only these exact counts give
    low = rate_bounds(unseen, len(val))[0]
    vocabularies = check_unknown_categories(codes, idx, max_rate=low)
    assert vocabularies == {"s": train.unique().tolist()} and "b" not in vocabularies["s"]
    rate = unseen / len(val)
    with pytest.raises(StageError, match=f"val split, column 's': {rate:.1%} of values"):
        check_unknown_categories(codes, idx, max_rate=low - 1e-9)


INGEST_SCRIPT = """
import logging, sys
from pathlib import Path
from fullstack_ml.stage import compose
from stages.ingest import ingest
logging.basicConfig(level=logging.INFO, format="%(message)s")
cfg = compose(["data=synthetic", f"data.synthetic.rows={sys.argv[1]}"])
ingest(cfg.data, cfg.seed, Path(sys.argv[2]))
"""


def run_on_terminal(args: list[str], columns: int = 120) -> str:
    """What `args` prints to a pseudo-terminal (stdout and stderr) `columns` wide."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    main, other = pty.openpty()
    fcntl.ioctl(other, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(args, stdout=other, stderr=other, close_fds=True)
    os.close(other)
    out = bytearray()
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait() == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_ingest_shows_a_progress_bar_on_a_terminal_and_phase_lines_in_logs(
    tmp_path: Path, in_repo_root: Path
) -> None:
    script = [sys.executable, "-c", INGEST_SCRIPT]
    shown = run_on_terminal([*script, "100000", str(tmp_path / "tty")])
    frames = shown.replace("\r\n", "\n").replace("\r", "\n").splitlines()
    bars = [f for f in frames if f.startswith("ingest 100,000 rows:")]
    # tqdm's bar: percent, elapsed<remaining, rate, and the step running
    assert any(
        re.search(r"\d+%\|.*\| \[\d\d:\d\d<\d\d:\d\d, [\d.]+[kM]?row/s, \w+\]", f) for f in bars
    )
    assert bars[-1].split("|")[0].endswith("100%"), bars[-1]
    logged = subprocess.run(
        [*script, "1000", str(tmp_path / "log")], capture_output=True, text=True, check=True
    ).stderr
    assert "%|" not in logged and "\r" not in logged
    steps = [line.split(": ")[1] for line in logged.splitlines() if line.startswith("ingest: ")]
    assert steps == ["read", "type", "check", "split", "write"]
    assert all(" rows in " in line for line in logged.splitlines() if line.startswith("ingest: "))


# ---------------------------------------------------------------- images (data=images)


def image_set(root: Path, per_class: int = 8) -> Path:
    """3 classes of pictures in PNG, JPEG and WebP, of mixed sizes and modes."""
    from test_images import encoded, shapes

    formats = [("PNG", "RGB"), ("JPEG", "L"), ("WEBP", "RGB"), ("PNG", "RGBA"), ("PNG", "P")]
    for c, label in enumerate(("circle", "square", "star")):
        for i in range(per_class):
            fmt, mode = formats[i % len(formats)]
            img = shapes(100 * c + i, size=48 + 8 * (i % 4)).convert(mode)
            path = root / label / f"{label}_{i:02d}.{fmt.lower()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded(img, fmt))
    return root


def images_cfg(path: Path, *overrides: str) -> DictConfig:
    return compose(["data=images", f"data.path={path}", *overrides]).data


def test_a_folder_of_images_is_curated_into_typed_splits(tmp_path: Path) -> None:
    """Every file decoded to data.image's size and mode, split stratified; the Parquet rows
    hold the file's own bytes where it is a PNG, JPEG or WebP at the size already, else the
    PNG of its decoded pixels, with the source path, the content hash and the image's
    statistics (profile reads them); either decodes to the pixels of the file."""
    from fullstack_ml.images import STATS, ImageSpec, curated_spec, decode, image_stats

    root = image_set(tmp_path / "set")
    schema = ingest(images_cfg(root), 0, tmp_path / "out")
    (feature,) = schema["features"]
    assert feature["kind"] == "image" and feature["size"] == [64, 64]
    assert feature["channels"] == 3 and len(feature["mean"]) == 3
    assert schema["classes"] == ["circle", "square", "star"]
    assert sum(schema["rows"].values()) == 24 and schema["rejected_files"] == 0
    train = pd.read_parquet(tmp_path / "out/train.parquet")
    stats = [f"image.{s}" for s in STATS["RGB"]]
    assert list(train.columns) == ["path", "label", "sha256", "image", *stats]
    kept = 0
    for _, row in train.iterrows():
        path, image = row["path"], row["image"]
        source = (root / path).read_bytes()
        pixels = decode(source, ImageSpec(size=(64, 64)))
        np.testing.assert_array_equal(decode(image, curated_spec(feature)), pixels)
        for stat, value in image_stats(pixels[None]).items():  # what profile reads
            assert row[f"image.{stat}"] == value[0]
        if Image_open(root / path).size == (64, 64):  # PNG, JPEG or WebP at the size
            assert image == source, path
            kept += 1
        else:
            assert image.startswith(b"\x89PNG") and image != source, path
    assert 0 < kept < len(train)
    assert pd.read_csv(tmp_path / "out/rejected.csv").empty


@pytest.mark.usefixtures("ray_local")
def test_images_curated_in_chunks_by_a_pool_or_ray_data_write_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is bounded by curating `CHUNK` files at a time (shards on disk): in chunks of
    5, by a process pool or by Ray Data tasks (data.engine=ray), a set with bad files and a
    duplicate gives the same splits, schema and rejects, byte for byte, as one chunk."""
    from stages.ingest import images as ingest_images

    root = image_set(tmp_path / "set")
    (root / "star/zero.png").write_bytes(b"")
    (root / "square/again.png").write_bytes((root / "square/square_00.png").read_bytes())
    drop = ["data.bad_files=drop", "data.image.max_bad_rate=0.5"]
    ingest(images_cfg(root, *drop), 0, tmp_path / "whole")
    monkeypatch.setattr(ingest_images, "CHUNK", 5)
    monkeypatch.setattr(ingest_images, "POOL_FROM", 1)
    ingest(images_cfg(root, *drop), 0, tmp_path / "pool")
    with ray_session.session():  # the session's Ray (ray_local)
        ingest(images_cfg(root, *drop, "data.engine=ray"), 0, tmp_path / "ray")
    for name in ("train.parquet", "val.parquet", "test.parquet", "schema.json", "rejected.csv"):
        whole = (tmp_path / "whole" / name).read_bytes()
        assert whole == (tmp_path / "pool" / name).read_bytes(), name
        assert whole == (tmp_path / "ray" / name).read_bytes(), name
    assert not list(tmp_path.glob("*/.shards")) and not list(tmp_path.glob(".*tmp-*"))
    rejected = pd.read_csv(tmp_path / "ray/rejected.csv")
    assert sorted(rejected["path"]) == ["square/square_00.png", "star/zero.png"]


def test_each_bad_image_file_fails_naming_it_or_is_dropped_and_listed(tmp_path: Path) -> None:
    from test_images import encoded, shapes

    root = image_set(tmp_path / "set")
    (root / "star/zero.png").write_bytes(b"")
    (root / "star/notes.png").write_bytes(b"a text file with an image's suffix")
    whole = encoded(shapes(7), "PNG")
    (root / "circle/cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "square/tiny.png").write_bytes(encoded(shapes(8).resize((4, 4)), "PNG"))
    (root / "square/again.png").write_bytes((root / "square/square_00.png").read_bytes())
    with pytest.raises(StageError, match=r"circle/cut.png: truncated or corrupt"):
        ingest(images_cfg(root), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    drop = images_cfg(root, "data.bad_files=drop", "data.image.max_bad_rate=0.5")
    schema = ingest(drop, 0, tmp_path / "out")
    rejected = pd.read_csv(tmp_path / "out/rejected.csv").set_index("path")["reason"]
    reasons = {Path(p).name: r for p, r in rejected.items()}
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["notes.png"].startswith("not an image")
    assert reasons["cut.png"].startswith("truncated or corrupt")
    assert reasons["tiny.png"] == "4x4: under data.image.min_size 8"
    # the same bytes twice: the first by path is kept, the other named with it
    assert reasons["square_00.png"] == "duplicate of square/again.png"  # relative to the set
    assert schema["rejected_files"] == 5 and sum(schema["rows"].values()) == 24
    strict = images_cfg(root, "data.bad_files=drop", "data.image.max_bad_rate=0.01")
    with pytest.raises(StageError, match=r"4 of 29 files are bad, over data.image.max_bad_rate"):
        ingest(strict, 0, tmp_path / "out2")  # 4 of 29: at least 4.9% at 95%


def test_a_near_duplicate_of_a_train_image_in_test_is_a_leak(tmp_path: Path) -> None:
    """Split folders are the splits; a resized JPEG copy of a train image in test fails the
    build naming both (drop: it leaves test, listed)."""
    from test_images import encoded, shapes

    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("a", "b"):
            for i in range(n):
                path = tmp_path / "set" / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encoded(shapes(hash((split, label, i)) % 10_000), "PNG"))
    from PIL import Image

    with Image.open(tmp_path / "set/train/a/0.png") as original:
        copy = original.resize((90, 90))
    (tmp_path / "set/test/a/copy.jpg").write_bytes(encoded(copy, "JPEG", quality=80))
    with pytest.raises(
        StageError, match=r"test/a/copy.jpg: a near-duplicate of train's .*train/a/0.png"
    ):
        ingest(images_cfg(tmp_path / "set"), 0, tmp_path / "out")
    schema = ingest(images_cfg(tmp_path / "set", "data.bad_files=drop"), 0, tmp_path / "out")
    assert schema["rows"] == {"train": 8, "val": 4, "test": 4}
    rejected = pd.read_csv(tmp_path / "out/rejected.csv")
    assert rejected["path"].str.endswith("copy.jpg").tolist() == [True]


def test_one_class_or_no_image_is_a_one_line_error(tmp_path: Path) -> None:
    root = image_set(tmp_path / "set", per_class=3)
    for label in ("square", "star"):
        for f in (root / label).iterdir():
            f.unlink()
        (root / label).rmdir()
    with pytest.raises(StageError, match=r"a single class \(circle\)"):
        ingest(images_cfg(root), 0, tmp_path / "out")
    with pytest.raises(StageError, match="no class folder holds an image file"):
        ingest(images_cfg(tmp_path / "empty"), 0, tmp_path / "out") if (
            tmp_path / "empty"
        ).mkdir() is None else None


def Image_open(path: Path):  # noqa: N802  PIL's Image.open, the file read now
    from PIL import Image

    with Image.open(path) as img:
        return img.copy()


def test_digits_images_render_offline_and_ingest_as_an_image_set(tmp_path: Path) -> None:
    """data=digits_images: the bundled digits written as PNG files and ingested; the curated
    paths are relative to the set (the temporary folder never shows), so a rerun writes
    the same bytes."""
    schema = ingest(compose(["data=digits_images"]).data, 42, tmp_path / "a")
    assert schema["rows"] == {"train": 1257, "val": 270, "test": 270}
    assert schema["features"][0]["size"] == [16, 16] and schema["features"][0]["channels"] == 1
    train = pd.read_parquet(tmp_path / "a/train.parquet")
    assert train["path"].str.fullmatch(r"\d/\d{4}\.png").all()
    assert set(train["label"]) == {str(d) for d in range(10)}
    folder = image_set(tmp_path / "set")  # a rerun: the same bytes
    ingest(images_cfg(folder), 0, tmp_path / "b")
    ingest(images_cfg(folder), 0, tmp_path / "c")
    for name in ("train.parquet", "test.parquet", "schema.json", "rejected.csv"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_an_s3_prefix_of_images_ingests_as_the_same_folder_would(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image set under s3://bucket/prefix/<label>/* (moto, credentials in the environment
    only) curates to the same splits as the folder it was uploaded from; a missing prefix is
    one line naming it."""
    import boto3

    local = image_set(tmp_path / "set")
    s3_env(monkeypatch, s3_server)
    s3 = boto3.client("s3")
    for path in sorted(local.rglob("*.*")):
        key = f"images/{path.relative_to(local)}"
        s3.put_object(Bucket=s3_server.bucket, Key=key, Body=path.read_bytes())
    url = f"s3://{s3_server.bucket}/images"
    ingest(images_cfg(url), 0, tmp_path / "remote")
    ingest(images_cfg(local), 0, tmp_path / "local")
    for split in ("train", "val", "test"):
        remote = pd.read_parquet(tmp_path / f"remote/{split}.parquet")
        pd.testing.assert_frame_equal(remote, pd.read_parquet(tmp_path / f"local/{split}.parquet"))
    with pytest.raises(StageError, match=f"data.path: s3://{s3_server.bucket}/nothing: no class"):
        ingest(images_cfg(f"s3://{s3_server.bucket}/nothing"), 0, tmp_path / "none")
