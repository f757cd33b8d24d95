"""engine=ray: the input as a Ray dataset, scored by actors that each load the model once."""

import logging
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.stage import StageError
from stages.predict.images import find_files, is_manifest, storage_options
from stages.predict.model import Model
from stages.predict.sample import Sample
from stages.predict.score import Scored, Scoring, check_columns, load_runtime, score_part

log = logging.getLogger("stages.predict")
TABLES_ONLY = "predict.engine=ray scores tables, predict.engine=pandas image files"


class RayScorer:
    """engine=ray: a Ray Data actor that loads the model once (its files: `files[0]`, a
    reference to file name -> bytes in the object store, so any node can load it) and
    scores blocks; the block's rows that enter the actor's own drift sample go to the
    driver with their keys (pickled into the first row of `__sample`)."""

    def __init__(self, files: list[Any], serving: Any, cfg: dict, seed: int) -> None:
        import ray

        with tempfile.TemporaryDirectory(prefix="predict-model-") as tmp:  # loaded whole
            for name, data in ray.get(files[0]).items():
                (Path(tmp) / name).write_bytes(data)
            size, ids = cfg["batch_rows"], cfg["id_columns"]
            runtime, pixels = cfg["runtime"], cfg["max_pixels"]
            self.rt = load_runtime(Path(tmp), serving, size, ids, runtime, 1, pixels)
        self.sample = Sample(cfg["drift_rows"], seed) if cfg["drift"] else None
        self.seed = seed

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        frame, reasons, good = score_part(part, self.rt)
        frame["__reason"] = reasons
        blob: list[bytes | None] = [None] * len(frame)
        if self.sample is not None and good and len(next(iter(good.values()))):
            # keys seeded by the block's rows: the same input gives the same sample
            digest = pd.util.hash_pandas_object(part, index=False).to_numpy()
            rng = np.random.default_rng([self.seed, int(digest.sum())])
            keys = rng.random(len(next(iter(good.values()))))
            taken = self.sample.add({}, keys)
            blob[0] = pickle.dumps(({k: v[taken] for k, v in good.items()}, keys[taken]))
        frame["__sample"] = blob
        return frame


def check_tables(cfg: DictConfig, meta: dict[str, Any]) -> None:
    """A StageError where the input is image files (before a Ray starts for nothing)."""
    images = meta["preprocessing"].get("images")
    if images and find_files(cfg.input, storage_options(cfg.input), "predict.input"):
        raise StageError(f"{cfg.input.path}: image files; {TABLES_ONLY}")


def ray_parts(
    cfg: DictConfig, model: Model, meta: dict[str, Any], ids: list[str], seed: int
) -> Scoring:
    """engine=ray: the input as a Ray dataset, scored by `predict.workers` actors
    (`map_batches`), the answers streamed back in the input's order. Tables only (a table
    of encoded images too): image files are scored by engine=pandas."""
    import ray.data

    from fullstack_ml.ray_session import bounded_ray_data
    from fullstack_ml.ray_source import ray_source, stage_error

    bounded_ray_data()
    warnings.filterwarnings("ignore", "The minimum number of concurrent actors")  # few blocks
    options = ray.data.DataContext.get_current().execution_options
    ordered = options.preserve_order  # restored when the answers are in: the Ray is shared
    options.preserve_order = True  # the driver numbers the rows
    try:
        ds, source, empty = ray_source(cfg.input, seed, "predict.input")
        columns = [str(c) for c in empty.columns]
        if is_manifest(columns, meta["preprocessing"].get("images")):
            raise StageError(f"{source}: a manifest of image files; {TABLES_ONLY}")
        check_columns(columns, meta, ids, source)
    except BaseException:
        options.preserve_order = ordered
        raise
    log.info("scoring %s with %s on Ray Data (%d actors)", source, model.name, cfg.workers)
    files = {p.name: p.read_bytes() for p in model.dir.iterdir() if p.is_file()}
    plain = OmegaConf.to_container(cfg)
    scored = ds.map_batches(
        RayScorer,
        fn_constructor_args=([ray.put(files)], model.serving, plain, seed),
        batch_format="pandas",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=int(cfg.workers)),
        num_cpus=1,
    )

    def parts() -> Iterator[Scored]:
        try:
            for frame in scored.iter_batches(batch_size=None, batch_format="pandas"):
                reasons = frame.pop("__reason").to_numpy(dtype=object)
                blobs = frame.pop("__sample")  # one per actor's block: a batch may join blocks
                found = [pickle.loads(b) for b in blobs[blobs.notna()]]
                rows, keys = {}, None
                if found:
                    rows = {k: np.concatenate([f[0][k] for f in found]) for k in found[0][0]}
                    keys = np.concatenate([f[1] for f in found])
                yield frame, np.where(pd.isna(reasons), None, reasons), rows, keys
        except Exception as err:  # a StageError raised in an actor arrives wrapped
            raise stage_error(err) from None
        finally:
            options.preserve_order = ordered

    return Scoring(source, ids, "rows", parts())
