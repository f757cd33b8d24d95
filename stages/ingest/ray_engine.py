"""`data.engine=ray`: one streaming pass over the source on Ray Data."""

# isort: off
from fullstack_ml import ray_session  # sets Ray's environment before Ray loads
# isort: on

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.paths import SPLITS
from fullstack_ml.ray_source import ray_source, stage_error
from fullstack_ml.schema import build_schema
from fullstack_ml.stage import StageError, atomic_dir, write_json
from stages.ingest.columns import (
    apply_types,
    check_target,
    curated_columns,
    decide_task,
    feature_columns,
    kept_columns,
)
from stages.ingest.gates import leaks, quality_gates, unknown_gate
from stages.ingest.split import assign_splits, check_split, write_part

log = logging.getLogger("stages.ingest")


def process_block(batch: Any, spec: dict[str, Any]) -> pd.DataFrame:
    """Type, check, split and write one block (a pyarrow table); returns its statistics
    (one row of JSON) and the row hashes (for the duplicate count). Parts are named by a
    hash of their rows: the same data gives the same files."""
    df = batch.to_pandas()  # numpy-backed dtypes, as in the pandas path
    df.columns = [str(c) for c in df.columns]
    df, _, unparsed = apply_types(df, spec["declared"], spec["source"], spec["bad_rows"])
    typed = len(df)
    df = check_target(df, spec["target"], spec["source"], spec["bad_rows"])
    df = curated_columns(df, spec["numeric"], spec["categorical"], spec["keep"])
    where = assign_splits(df, spec["split"], spec["seed"], spec["cuts"])
    stats: dict[str, Any] = {"dropped": unparsed + typed - len(df), "rows": {}, "min": {}}
    stats.update(max={}, nulls={c: int(df[c].isna().sum()) for c in spec["features"]})
    stats["categories"] = {}
    hashes = pd.util.hash_pandas_object(df, index=False).to_numpy()
    name = f"part-{hashlib.sha256(hashes.tobytes()).hexdigest()[:32]}.parquet"
    for k, split in enumerate(SPLITS):
        part = df[where == k]
        stats["rows"][split] = len(part)
        stats["categories"][split] = {
            c: part[c].value_counts().to_dict() for c in spec["categorical"]
        }
        if split == "train":
            present = [c for c in spec["numeric"] if part[c].notna().any()]
            stats["min"] = {c: float(part[c].min()) for c in present}
            stats["max"] = {c: float(part[c].max()) for c in present}
        if len(part):
            folder = Path(spec["out"]) / f"{split}.parquet"
            folder.mkdir(exist_ok=True)
            write_part(part, folder / name)
    y = df[spec["target"]]
    counts = y.value_counts()  # as [value, count] pairs: JSON keeps the values' types
    stats["targets"] = [[v, int(n)] for v, n in counts.items()] if len(counts) <= 1000 else None
    stats["integral"] = bool(pd.api.types.is_numeric_dtype(y) and (y == y.round()).all())
    stats["leaks"] = [c for c in spec["features"] if len(df) and leaks(df[c], y)]
    return pd.DataFrame({"stats": [json.dumps(stats, default=str)], "hashes": [hashes]})


def merge_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The blocks' statistics added up."""
    total: dict[str, Any] = {"dropped": 0, "rows": dict.fromkeys(SPLITS, 0), "min": {}, "max": {}}
    total.update(nulls={}, categories={s: {} for s in SPLITS}, targets={}, integral=True)
    total["leaks"] = None
    for s in rows:
        total["dropped"] += s["dropped"]
        for split in SPLITS:
            total["rows"][split] += s["rows"][split]
            for c, counts in s["categories"][split].items():
                merged = total["categories"][split].setdefault(c, {})
                for value, n in counts.items():
                    merged[value] = merged.get(value, 0) + n
        for c, v in s["min"].items():
            total["min"][c] = min(v, total["min"].get(c, v))
        for c, v in s["max"].items():
            total["max"][c] = max(v, total["max"].get(c, v))
        for c, n in s["nulls"].items():
            total["nulls"][c] = total["nulls"].get(c, 0) + n
        if s["targets"] is None or total["targets"] is None:
            total["targets"] = None
        else:
            for value, n in s["targets"]:
                total["targets"][value] = total["targets"].get(value, 0) + n
        total["integral"] &= s["integral"]
        leaking = set(s["leaks"])
        total["leaks"] = leaking if total["leaks"] is None else total["leaks"] & leaking
    return total


def ingest_ray(
    data_cfg: DictConfig, seed: int, out_dir: Path, address: str | None = None
) -> dict[str, Any]:
    """`ingest` on Ray Data: read, type, check, split and write each block in parallel, in
    one streaming pass; splits are folders of Parquet parts. Stratified splits are random
    here (a seeded hash of each row); a time split reads its column once more for the cuts.
    """
    if data_cfg.bad_rows not in ("fail", "drop"):
        raise StageError(f"data.bad_rows: {data_cfg.bad_rows!r} is not fail | drop")
    with ray_session.session(address):
        return ray_pass(data_cfg, seed, out_dir)


def ray_pass(data_cfg: DictConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """`ingest_ray` on a running Ray."""
    ray_session.bounded_ray_data()
    ds, source, sample = ray_source(data_cfg, seed)
    sample.columns = [str(c) for c in sample.columns]
    declared = OmegaConf.to_container(data_cfg.columns) if data_cfg.columns else None
    sample, types, _ = apply_types(sample, declared, source, data_cfg.bad_rows)
    check_target(sample, data_cfg.target, source, data_cfg.bad_rows)
    numeric, categorical = feature_columns(sample, data_cfg, types, source)
    split = OmegaConf.to_container(data_cfg.split)
    check_split(split, list(sample.columns))
    cuts = None
    if split["strategy"] == "time":
        t = ds.select_columns([split["column"]]).to_pandas()[split["column"]]
        cuts = tuple(
            t.quantile([1 - split["val_size"] - split["test_size"], 1 - split["test_size"]])
        )
    keep = kept_columns(numeric, categorical, data_cfg.target, split["column"])
    with atomic_dir(out_dir) as tmp:
        spec = {
            "declared": declared,
            "source": source,
            "bad_rows": data_cfg.bad_rows,
            "target": data_cfg.target,
            "numeric": numeric,
            "categorical": categorical,
            "features": numeric + categorical,
            "keep": keep,
            "split": split,
            "seed": seed,
            "cuts": cuts,
            "out": str(tmp.resolve()),
        }
        try:
            blocks = ds.map_batches(
                process_block, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None
            ).take_all()
        except Exception as err:  # a StageError raised in a block arrives wrapped
            raise stage_error(err) from None
        stats = merge_stats([json.loads(b["stats"]) for b in blocks])
        n = sum(stats["rows"].values())
        if n == 0:
            raise StageError(f"{source}: no data rows left")
        hashes = np.concatenate([b["hashes"] for b in blocks])
        duplicates = n - len(np.unique(hashes))
        quality = data_cfg.quality
        leaking = sorted(stats["leaks"])
        quality_gates(duplicates, n, leaking, data_cfg.target, quality, source)
        for name, rows in stats["rows"].items():
            if rows == 0:
                raise StageError(f"data.split: the {name} split of {n} rows is empty")
        train_categories = stats["categories"]["train"]
        for c in categorical:
            known = train_categories.get(c, {})
            for name in ("val", "test"):
                counts = stats["categories"][name].get(c, {})
                unseen = sum(v for k, v in counts.items() if k not in known)
                unknown_gate(name, c, unseen, sum(counts.values()), quality.max_unknown_categories)
        target_dtype = sample[data_cfg.target].dtype
        distinct = None if stats["targets"] is None else len(stats["targets"])
        task = decide_task(
            data_cfg.task, target_dtype, stats["integral"], distinct, data_cfg.target
        )
        if task == "classification" and stats["targets"] is None:
            raise StageError(f"target column {data_cfg.target!r}: over 1000 classes (data.task)")
        schema = build_schema(
            source=source,
            task=task,
            types=types,
            numeric=numeric,
            categorical=categorical,
            target=data_cfg.target,
            target_dtype=str(target_dtype),
            nullable={c for c in numeric + categorical if stats["nulls"].get(c, 0) > 0},
            ranges={c: (stats["min"][c], stats["max"][c]) for c in stats["min"]},
            categories={c: list(train_categories.get(c, {})) for c in categorical},
            classes=list(stats["targets"]) if task == "classification" else [],
            rows=stats["rows"],
            dropped_rows=stats["dropped"],
            duplicate_rows=duplicates,
            split=split,
            engine="ray",
        )
        write_json(tmp / "schema.json", schema)
    log.info(
        "wrote %s with Ray Data: %s rows, %s",
        out_dir,
        "/".join(map(str, stats["rows"].values())),
        task,
    )
    return schema
