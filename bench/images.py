"""Images benchmark (issue 34): ingest, training, serving and batch scoring of an image set,
each against a baseline measured in the same run, printed as tables of ratios.

The images: `--images` 64x64 RGB pictures made from scikit-learn's digits (a random digit
scaled to 36-56 pixels, shifted, in a random colour on a random background, Gaussian noise of
sd 12), every other one a PNG and the rest JPEG (quality 90), in `<set>/<label>/` (made in a
process pool before anything is timed). Each measured run is a fresh process.

1. ingest   (floor)  Pillow decode + resize of every file in a process pool over all cores,
                     the pixels written to Parquet with their labels: nothing else;
            (stages) the ingest stage (data=images, data.bad_files=drop: the near-duplicates
                     the digits make are dropped and counted), then the profile stage.
            Images/s, and the floor's time over the stage's (throughput): target >= 0.5.
2. memory   the ingest stage at each `--memory-scale` count: the peak RSS of its process
            (getrusage, read when ingest returns), of its pool's largest worker, and the
            peak PSS and RSS of its process tree (sampled); most over fewest: target <= 1.5.
            A run past `--memory-cap-gb` of tree RSS is killed and reported as such.
3. train    the train stage's `fit` (Ray Train local mode) against bench.train's plain
            PyTorch loop (1 thread and torch's default threads) on the same curated images
            (`--train-images`), model (cnn_small), batch size, optimizer and epochs, with
            train=images' augmentation off (the loop has none; a last run, not in the
            smoke, shows fit with it): images/s over the median epoch; fit / loop: >= 0.8.
4. serve    the bento under `bentoml serve` (POST /predict_proba) against bench/fastapi_app.py's
            image routes (the FP32 ConvNet in torch eager, one uvicorn worker), wrk posting one
            multipart upload (a PNG of the set) per request at each `--concurrency`:
            images/s, bento / the better FastAPI route: target >= 1.0 at 16.
5. predict  `python -m stages.predict` with the bento on the folder of `--images` images:
            images/s over its wall time (start-up included) / the bento's HTTP images/s
            (the best of (4)'s concurrencies): target >= 20.
6. digits   data=digits_images model=cnn_small trained as configured: test accuracy
            (target >= 0.99; the MLP on the tabular digits: 0.985).
Then INT8 against FP32 for each model built, from its compress stage's
`reports/compress.json`: size (target <= 0.30x), test accuracy (within 0.5 points) and batch-64
latency, Inductor-compiled INT8 over FP32 eager (target <= 0.5x).

The models are built by the stages as DVC runs them (params.yaml composed, then
`python -m stages.X --params`) in a folder of their own: (4) and (5) use the bento of a
cnn_small trained `--epochs` epochs on the `--train-images` set (accuracy is not the point:
it skips the compress accuracy budget); the smoke builds one model for every part, on
data=digits_images (1 epoch); a stage that fails is reported with its log's tail,
and what needed it is reported as not run (the exit status is then 1).

    python -m bench.images                               # 50,000 images; memory at 200,000
    python -m bench.images --images 20000 --memory-scale 5000,20000 --parts ingest,memory
    python -m bench.images --smoke                       # 300 images, 1 epoch, 1 s loads
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import serve as bench_serve
from bench.ingest import memory, tree
from bench.runtime import markdown

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PARTS = ("ingest", "memory", "train", "serve", "predict", "digits")
SIDE = 64  # pixels: the images' width and height (data=images' default size)
CHUNK = 1000  # images a generating task writes
POLL_S = 0.2
TARGETS = {"ingest": 0.5, "memory": 1.5, "train": 0.8, "serve": 1.0, "predict": 20.0}
INT8_TARGETS = {"size": 0.30, "accuracy": 0.5, "latency": 0.5}
TARGET_CONCURRENCY = 16
DIGITS_ACCURACY = 0.99  # the issue's; the MLP on the tabular digits gets 0.985
BUILD = [  # every build: the served outlier detectors alone (PyOD's are fitted, not served)
    "outliers.candidates=[max_softmax,energy]",
]
SMOKE_BUILD = [  # eager only, one calibration batch, the batch sizes the tables read
    "compress.compile=false",
    "compress.calibration_batches=1",
    "compress.batch_sizes=[1,64]",
]
SMOKE = {
    "images": 300,
    "memory_scale": [150, 300],
    "train_images": 300,
    "epochs": 1,
    "concurrency": [TARGET_CONCURRENCY],
    "duration": 1,
    "warmup": 1,
    "rounds": 1,
    "latency_repeats": 2,
}


# ---------------------------------------------------------------- the images (not timed)


def write_chunk(start: int, count: int, root: Path, seed: int) -> None:
    """Images `start` .. `start + CHUNK` (of `count`) of the set, seeded by `seed`, `start`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([seed, start])
    for i in range(start, min(start + CHUNK, count)):
        k = int(rng.integers(len(digits.target)))
        side = int(rng.integers(36, 57))
        glyph = Image.fromarray(np.rint(digits.images[k] * (255 / 16)).astype(np.uint8), "L")
        glyph = glyph.resize((side, side), Image.Resampling.BILINEAR)
        ink = np.asarray(glyph, dtype=np.float32)[..., None] / 255
        x, y = (int(v) for v in rng.integers(0, SIDE - side + 1, 2))
        back, fore = rng.uniform(0, 100, 3), rng.uniform(150, 255, 3)
        canvas = np.broadcast_to(back, (SIDE, SIDE, 3)).copy()
        canvas[y : y + side, x : x + side] += ink * (fore - back)
        canvas += rng.normal(0, 12, canvas.shape)
        img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
        path = root / str(digits.target[k]) / f"{i:06d}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=90) if i % 2 else img.save(path, "PNG")


def image_set(count: int, work: Path, seed: int = 0) -> Path:
    """The set of `count` images in `work` (made once per count)."""
    root = work / f"images-{count}"
    if not root.is_dir():
        began = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            write = partial(write_chunk, count=count, root=root, seed=seed)
            list(pool.map(write, range(0, count, CHUNK)))
        took = time.perf_counter() - began
        print(f"setup: {count:,} images in {root} ({took:.1f} s)", file=sys.stderr)
    return root


# ---------------------------------------------------------------- measured processes


def floor_decode(path: str) -> bytes:
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR).tobytes()


def child_floor(root: Path, out: Path) -> dict[str, Any]:
    """(floor): every file decoded and resized in a process pool, written to Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    began = time.perf_counter()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        pixels = list(pool.map(floor_decode, map(str, files), chunksize=64))
    labels = [p.parent.name for p in files]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"label": labels, "image": pixels}), out / "images.parquet")
    return {"ingest": time.perf_counter() - began, "kept": len(files), "rejected": 0}


def child_decode(root: Path) -> dict[str, Any]:
    """(5, decode floor): every file of the set decoded and resized by Pillow alone in a
    process pool over all cores, the pixels sent back and dropped."""
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    began = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for _ in pool.map(floor_decode, files, chunksize=64):
            pass
    return {"seconds": time.perf_counter() - began, "images": len(files)}


def child_model(bento: Path, seconds: float) -> dict[str, Any]:
    """(5, model alone): the bento's model loaded as predict loads it (predict.runtime,
    predict.threads, the path its plan runs batches of predict.batch_rows on), run on
    encoded images in memory for `seconds`, and the outlier detector on its answers."""
    from fullstack_ml.stage import compose
    from stages.predict.model import open_model
    from stages.predict.score import load_runtime

    cfg = compose().predict
    size = int(cfg.batch_rows)
    with open_model(str(bento)) as model:
        args = (size, [], cfg.runtime, int(cfg.threads), int(cfg.max_pixels))
        rt = load_runtime(model.dir, model.serving, *args)
        x = np.random.default_rng(0).standard_normal((size, rt.pre.width), dtype=np.float32)
        rt.detector.score(x, rt.engine(x))  # warm
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            rt.detector.score(x, rt.engine(x))
            done += size
    took = time.perf_counter() - began
    return {"images_s": done / took, "runtime": rt.engine.runtime, "threads": int(cfg.threads)}


def child_stages(root: Path, out: Path, with_profile: bool) -> dict[str, Any]:
    """(stages): the ingest stage, then (`with_profile`) the profile stage."""
    import resource

    from fullstack_ml.images import REJECTED
    from fullstack_ml.paths import SPLITS
    from fullstack_ml.stage import compose
    from stages.ingest import ingest
    from stages.profile import profile

    cfg = compose(["data=images", f"data.path={root}", "data.bad_files=drop"])
    began = time.perf_counter()
    schema = ingest(cfg.data, cfg.seed, out / "data")
    result = {"ingest": time.perf_counter() - began, "kept": sum(schema["rows"].values())}
    result["rejected"] = schema["rejected_files"]
    result["ingest_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    result["worker_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if with_profile:
        splits = {name: out / "data" / f"{name}.parquet" for name in SPLITS}
        began = time.perf_counter()
        profile(splits, schema, cfg.profile, out / "profile", rejected=out / "data" / REJECTED)
        result["profile"] = time.perf_counter() - began
    return result


def train_overrides(epochs: int, augment: bool) -> list[str]:
    """An image set's config (cnn_small, train=images) trained `epochs` epochs, every one
    run; without `augment`, its augmentation off (the plain loop has none)."""
    overrides = ["data=images", f"train.epochs={epochs}", "train.early_stopping.patience=null"]
    return (
        overrides if augment else [*overrides, "train.augment.shift=0", "train.augment.rotation=0"]
    )


def child_train(run: str, data: Path, epochs: int, threads: int, augment: bool) -> dict[str, Any]:
    """(fit) the train stage's `fit` in local mode, or (loop) bench.train's plain loop with
    `threads` torch threads (0: torch's default); `augment`: train.augment as configured."""
    from bench.train import child_ray, child_torch
    from fullstack_ml.stage import compose

    cfg = compose(train_overrides(epochs, augment))
    if run == "fit":
        return child_ray(cfg, data, 0)
    return child_torch(cfg, data, threads or None)


def child(args: argparse.Namespace) -> None:
    """The body of one measured process: prints one `RESULT {json}` line."""
    if args.child == "floor":
        result = child_floor(args.root, args.out)
    elif args.child == "decode":
        result = child_decode(args.root)
    elif args.child == "model":
        result = child_model(args.root, args.duration)
    elif args.child in ("ingest", "ingest+profile"):
        result = child_stages(args.root, args.out, args.child == "ingest+profile")
    else:
        run = args.child[len("train-") :]
        result = child_train(run, args.root, args.epochs, args.threads, args.augment)
    print("RESULT " + json.dumps(result), flush=True)


def measure(child_args: list[str], log: Path, cap_bytes: int) -> dict[str, Any]:
    """`python -m bench.images --child ...` in a session of its own: its result with its wall
    time and the peak PSS and RSS (MiB) of its process tree (bench.ingest's sampling), or
    {"error": why} with those; killed once its tree's RSS passes `cap_bytes`."""
    cmd = [sys.executable, "-m", "bench.images", "--child", *child_args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WHYLOGS_NO_ANALYTICS": "1"}
    peak_pss = peak_rss = 0
    capped = False
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            pss, rss = memory(tree(root, proc.pid))
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            if rss > cap_bytes:
                capped = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(POLL_S)
    figures = {"wall": time.perf_counter() - began, "peak_pss": peak_pss / 2**20}
    figures["peak_rss"] = peak_rss / 2**20
    lines = log.read_text(errors="replace").splitlines()
    results = [x for x in lines if x.startswith("RESULT ")]
    if proc.returncode == 0 and results:
        return json.loads(results[-1][len("RESULT ") :]) | figures
    if capped:
        why = f"killed at {peak_rss / 2**30:.1f} GiB of RSS (--memory-cap-gb)"
    else:
        last = [x for x in lines if x.strip()][-1:] or [f"exit {proc.returncode}"]
        why = f"exit {proc.returncode}: {last[0].strip()[:200]}"
    print(f"error: {' '.join(child_args[:1])} failed, {why} (log {log})", file=sys.stderr)
    return {"error": why} | figures


# ---------------------------------------------------------------- 1, 2: ingest and memory


def ingest_runs(args: argparse.Namespace, work: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """(count, run) -> result: the floor and the stages at `--images`, the ingest stage
    alone at the other `--memory-scale` counts (run only for the parts asked)."""
    plan = []
    if "ingest" in args.parts:
        plan += [(args.images, "floor"), (args.images, "stages")]
    if "memory" in args.parts:
        plan += [(n, "ingest") for n in args.memory_scale if (n, "stages") not in plan]
    results = {}
    for n, run in plan:
        root = image_set(n, work)
        out, log = work / f"out-{n}-{run}", work / f"{n}-{run}.log"
        what = {"floor": "floor", "stages": "ingest+profile", "ingest": "ingest"}[run]
        results[n, run] = measure(
            [what, "--root", str(root), "--out", str(out)], log, args.memory_cap
        )
        shutil.rmtree(out, ignore_errors=True)
        if n != args.images and n != args.train_images:  # 200,000 images: 1.6 GB
            shutil.rmtree(root, ignore_errors=True)
        print(f"ingest {n} {run}: {json.dumps(results[n, run])}", file=sys.stderr)
    return results


def ingest_table(results: dict[tuple[int, str], dict[str, Any]], n: int) -> list[dict]:
    floor = results[n, "floor"]
    rows = []
    for run in ("floor", "stages"):
        r = results[n, run]
        row = {"images": f"{n:,}", "run": run}
        if "error" in r:
            rows.append(row | dict.fromkeys(INGEST_COLUMNS, "-") | {"note": r["error"]})
            continue
        total = r["ingest"] + r.get("profile", 0.0)
        fine = "error" not in floor
        row |= {
            "ingest s": f"{r['ingest']:.2f}",
            "profile s": f"{r['profile']:.2f}" if "profile" in r else "-",
            "images/s (ingest)": f"{n / r['ingest']:,.0f}",
            "ingest / floor": f"{floor['ingest'] / r['ingest']:.2f}" if fine else "-",
            "ingest+profile / floor": f"{floor['ingest'] / total:.2f}" if fine else "-",
            "kept": f"{r['kept']:,}",
            "rejected": f"{r['rejected']:,}",
            "peak PSS MiB": f"{r['peak_pss']:,.0f}",
            "note": "",
        }
        rows.append(row)
    return rows


INGEST_COLUMNS = (
    "ingest s",
    "profile s",
    "images/s (ingest)",
    "ingest / floor",
    "ingest+profile / floor",
    "kept",
    "rejected",
    "peak PSS MiB",
)


def memory_table(results: dict[tuple[int, str], dict[str, Any]], counts: list[int]) -> list[dict]:
    runs = {n: results.get((n, "ingest"), results.get((n, "stages"))) for n in sorted(counts)}
    fewest = runs[min(runs)]
    rows = []
    for n, r in runs.items():
        if "error" in r:
            rows.append(
                {"images": f"{n:,}", "ingest RSS MiB": "-", "pool worker RSS MiB": "-"}
                | {"tree peak PSS MiB": f"{r['peak_pss']:,.0f}", "RSS / fewest": "-"}
                | {"note": r["error"]}
            )
            continue
        growth = r["ingest_rss"] / fewest["ingest_rss"] if "error" not in fewest else None
        rows.append(
            {
                "images": f"{n:,}",
                "ingest RSS MiB": f"{r['ingest_rss']:,.0f}",
                "pool worker RSS MiB": f"{r['worker_rss']:,.0f}",
                "tree peak PSS MiB": f"{r['peak_pss']:,.0f}",
                "RSS / fewest": f"{growth:.2f}" if growth else "-",
                "note": "with the profile stage after it" if (n, "stages") in results else "",
            }
        )
    return rows


# ---------------------------------------------------------------- 3: training


def train_runs(args: argparse.Namespace, data: Path, work: Path) -> dict[str, dict[str, Any]]:
    runs = {"torch, 1 thread": ("train-loop", 1, [])}
    if not args.smoke:  # the same loop, torch's threads aside
        runs["torch, default threads"] = ("train-loop", 0, [])
    runs["fit, local mode"] = ("train-fit", 1, [])
    if not args.smoke:  # what augmentation (train=images: shift, rotation) costs on top
        runs["fit, local mode, train.augment as configured"] = ("train-fit", 1, ["--augment"])
    results = {}
    for label, (what, threads, more) in runs.items():
        common = ["--root", str(data), "--epochs", str(args.epochs), "--threads", str(threads)]
        log = work / f"{what}-{threads}{''.join(more)}.log"
        r = measure([what, *common, *more], log, args.memory_cap)
        if "error" not in r:
            r["epoch"] = statistics.median(r["epochs"])
            r["startup"] = r["wall"] - sum(r["epochs"])
        results[label] = r
        print(f"train {label}: {json.dumps(r)}", file=sys.stderr)
    return results


def train_table(results: dict[str, dict[str, Any]]) -> list[dict]:
    rate = {k: r["rows"] / r["epoch"] for k, r in results.items() if "error" not in r}
    rows = []
    for label, r in results.items():
        if "error" in r:
            rows.append({"run": label, "start-up s": "-", "median epoch s": "-"} | {
                "images/s": "-", "vs torch 1 thread": "-", "note": r["error"]})  # fmt: skip
            continue
        one = rate.get("torch, 1 thread")
        rows.append(
            {
                "run": label,
                "start-up s": f"{r['startup']:.1f}",
                "median epoch s": f"{r['epoch']:.2f}",
                "images/s": f"{rate[label]:,.0f}",
                "vs torch 1 thread": f"{rate[label] / one:.2f}" if one else "-",
                "note": f"{r['rows']:,} train images, epochs: {len(r['epochs'])}",
            }
        )
    return rows


# ---------------------------------------------------------------- builds (the stages)


@dataclass
class Build:
    name: str
    dir: Path  # the stages' working folder: params.yaml, data/, models/, reports/, dist/
    seconds: dict[str, float]  # stage -> wall s
    error: str | None = None  # the failed stage and its log's tail

    @property
    def bento(self) -> Path:
        info = json.loads((self.dir / "dist/bento.json").read_text())
        return self.dir / "dist" / info["file"]


def build(name: str, overrides: list[str], folder: Path, stages: tuple[str, ...]) -> Build:
    """`stages` run as DVC runs them in `folder` (params.yaml composed from conf/ with
    `overrides`, then `python -m stages.X --params`), their output to `folder/build.log`."""
    from bench.pipeline import sh

    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(folder / "bentoml")}
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "BENTOML_DO_NOT_TRACK": "true"}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "WHYLOGS_NO_ANALYTICS": "1"}
    log, seconds = folder / "build.log", {}
    try:
        sh([sys.executable, "-m", "fullstack_ml.stage", *overrides], folder, env, log)
        for stage in stages:
            seconds[stage] = sh(
                [sys.executable, "-m", f"stages.{stage}", "--params"], folder, env, log
            )
            print(f"build {name}: {stage} {seconds[stage]:.1f} s", file=sys.stderr)
    except SystemExit as err:  # bench.pipeline.sh: the command that failed, its log's tail
        print(f"build {name}: {err}", file=sys.stderr)
        return Build(name, folder, seconds, str(err))
    return Build(name, folder, seconds)


def build_overrides(args: argparse.Namespace) -> list[str]:
    quick = [*BUILD, f"compress.latency_repeats={args.latency_repeats}"]
    return [*quick, *SMOKE_BUILD] if args.smoke else quick


def int8_row(built: Build) -> dict[str, str]:
    """INT8 against FP32 from the build's reports/compress.json (test split, 1 thread)."""
    r = json.loads((built.dir / "reports/compress.json").read_text())
    fp32, int8 = r["fp32"], r["compressed"]
    eager = fp32["latency_ms"]["eager"]["64"]
    compiled = int8["latency_ms"].get("compiled", {}).get("64")
    layers = int8.get("int8_layers", {})
    return {
        "model": built.name,
        "shipped": r["method"],
        "INT8 layers": ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in layers.items()) or "-",
        "FP32 KB": f"{fp32['size_bytes'] / 1024:,.0f}",
        "INT8 / FP32 size": f"{int8['size_bytes'] / fp32['size_bytes']:.2f}",
        "FP32 accuracy": f"{fp32['accuracy']:.4f}",
        "INT8 accuracy": f"{int8['accuracy']:.4f}",
        "drop points": f"{100 * (fp32['accuracy'] - int8['accuracy']):.2f}",
        "b64 FP32 eager ms": f"{eager:.2f}",
        "b64 INT8 eager ms": f"{int8['latency_ms']['eager']['64']:.2f}",
        "b64 INT8 compiled ms": f"{compiled:.2f}" if compiled else "-",
        "compiled INT8 / FP32 eager": f"{compiled / eager:.2f}" if compiled else "-",
    }


# ---------------------------------------------------------------- 4, 5: serving and scoring


def upload(path: Path, work: Path) -> tuple[Path, Path, str]:
    """The multipart body of one upload of `path` (a part named `file`), a wrk script that
    posts it (bench/post.lua, its body file and report, with the body's Content-Type), and
    that Content-Type."""
    from urllib3 import encode_multipart_formdata

    kind = "image/png" if path.suffix == ".png" else "image/jpeg"
    data, content_type = encode_multipart_formdata([("file", (path.name, path.read_bytes(), kind))])
    body, script = work / "upload.multipart", work / "upload.lua"
    body.write_bytes(data)
    script.write_text(
        f"dofile({json.dumps(str(bench_serve.LUA))})\n"
        f'wrk.headers["Content-Type"] = {json.dumps(content_type)}\n'
    )
    return body, script, content_type


def answering(proc: subprocess.Popen, url: str, body: bytes, content_type: str, log: Path) -> None:
    """Wait until `url` answers the upload with 200; SystemExit naming the app if never."""
    for _ in range(240):
        if proc.poll() is not None:
            sys.exit(f"the FastAPI app exited:\n{log.read_text()[-2000:]}")
        request = urllib.request.Request(url, body, {"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet (urllib's HTTPError is one too)
            pass
        time.sleep(0.5)
    sys.exit(f"the FastAPI app did not answer {url} in 120 s:\n{log.read_text()[-2000:]}")


def wrk_upload(url: str, body: Path, script: Path, c: int, seconds: int) -> dict[str, float]:
    """bench.serve's wrk run with the upload's script in place of bench/post.lua."""
    return bench_serve.wrk(url, body, c, seconds, script)


def serve_runs(built: Build, image: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    """Rows of (server, concurrency) results: the bento and the FastAPI app's two routes,
    alternated round by round (shared cores drift), each warmed up at each concurrency."""
    from fullstack_ml.bento import free_port, serve_bento

    body, script, content_type = upload(image, work)
    app = work / "fastapi"  # bench/fastapi_app.py's BENCH_MODEL_DIR: model.pt2, schema.json
    app.mkdir(exist_ok=True)
    shutil.copyfile(built.dir / "models/compressed/model.pt2", app / "model.pt2")
    shutil.copyfile(built.dir / "data/curated/schema.json", app / "schema.json")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BENCH_MODEL_DIR": str(app)}
    env["BENCH_FP32_DIR"] = str(built.dir / "models/fp32")
    port, log = free_port(), work / "fastapi.log"
    cmd = [str(BIN / "python"), "-m", "uvicorn", "bench.fastapi_app:app"]
    proc = bench_serve.start([*cmd, "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        with serve_bento(built.bento) as served:
            base = f"http://127.0.0.1:{port}"
            answering(proc, f"{base}/predict_images", body.read_bytes(), content_type, log)
            urls = {
                "(a) bentoml": f"{served.url}/predict_proba",
                "(b) fastapi def": f"{base}/predict_images",
                "(b) fastapi async def": f"{base}/predict_images_async",
            }
            rows = []
            for c in args.concurrency:
                for url in urls.values():
                    wrk_upload(url, body, script, c, args.warmup)
                runs: dict[str, list[dict[str, float]]] = {label: [] for label in urls}
                for _ in range(args.rounds):
                    for label, url in urls.items():
                        runs[label].append(wrk_upload(url, body, script, c, args.duration))
                for label, got in runs.items():
                    median = sorted(got, key=lambda r: r["rps"])[len(got) // 2]
                    rows.append({"server": label, "c": c, **median})
                    print(f"serve {label} c={c}: {median}", file=sys.stderr)
    finally:
        bench_serve.stop(proc)
    return rows


def serve_table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        b = [x["rps"] for x in rows if x["c"] == r["c"] and x["server"].startswith("(b)")]
        a = next(x["rps"] for x in rows if x["c"] == r["c"] and x["server"].startswith("(a)"))
        out.append(
            {
                "server": r["server"],
                "concurrency": str(r["c"]),
                "images/s": f"{r['rps']:,.0f}",
                "p50 ms": f"{r['p50']:.1f}",
                "p99 ms": f"{r['p99']:.1f}",
                "non-2xx": str(r["non2xx"]),
                "socket err": str(r["socket"]),
                "(a) / best (b)": f"{a / max(b):.2f}" if r["server"].startswith("(a)") else "",
            }
        )
    return out


def predict_run(built: Build, folder: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """(5): bench.predict's run of the stage on the image folder, with the bento; then the
    floors of its two halves, each in a process of its own: Pillow's decode + resize of the
    same files alone (a pool over all cores) and the bento's model alone."""
    from bench.predict import run_predict

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    try:
        result = run_predict(built.bento, folder, work / "predict", env, "pandas")
    except SystemExit as err:  # the stage failed: its command and log
        return {"error": str(err)}
    result["images"] = sum(1 for p in folder.rglob("*") if p.is_file())
    decode = measure(["decode", "--root", str(folder)], work / "decode.log", args.memory_cap)
    result["decode"] = decode["images"] / decode["seconds"] if "seconds" in decode else None
    model = ["model", "--root", str(built.bento), "--duration", str(args.duration)]
    result["model"] = measure(model, work / "model.log", args.memory_cap).get("images_s")
    return result


def predict_table(r: dict[str, Any], http: float | None) -> list[dict]:
    """The stage's images/s (over its wall time, start-up included, and its scoring loop
    alone), the floors (decode alone, the model alone, and the two sharing the cores), and
    the ratios to the bento's HTTP images/s."""
    rate = r["images"] / r["wall"]
    loop = r["images"] / r["loop"] if np.isfinite(r["loop"]) else None
    decode, model = r.get("decode"), r.get("model")
    # the two on the same cores: decode's pool takes every core, the model 1 thread of one;
    # per image, decode costs cores / decode core-seconds and the model 1 / model
    cores = os.cpu_count() or 1
    both = cores / (cores / decode + 1 / model) if decode and model else None
    cell = lambda x: f"{x:,.0f}" if x else "-"  # noqa: E731
    ratio = lambda x: f"{x / http:.2f}" if x and http else "-"  # noqa: E731
    return [
        {
            "images": f"{r['images']:,}",
            "wall s": f"{r['wall']:.1f}",
            "images/s": f"{rate:,.0f}",
            "loop images/s": cell(loop),
            "decode floor images/s": cell(decode),
            "model alone images/s": cell(model),
            "both floor images/s": cell(both),
            "bento http images/s": cell(http),
            "predict / http": ratio(rate),
            "loop / http": ratio(loop),
            "both floor / http": ratio(both),
            "loop / both floor": f"{loop / both:.2f}" if loop and both else "-",
            "predicted": f"{r['predicted']:,}",
            "rejected": f"{r['rejected']:,}",
            "peak PSS MiB": f"{r['pss'] / 2**20:,.0f}",
        }
    ]


# ---------------------------------------------------------------- the report


def target(what: str, got: float, ok: bool, unit: str = "x") -> str:
    return f"{what}: {got:.2f}{unit} ({'met' if ok else 'NOT met'})"


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def report(args: argparse.Namespace, found: dict[str, Any]) -> tuple[str, list[str]]:
    """The tables and the targets as text, and what failed or did not run."""
    out, targets, failed = [], [], list(found.get("failed", []))
    if args.smoke:
        out += ["(--smoke: tiny sets, 1 epoch, 1 s loads: the figures are not evidence)", ""]
    ingest, n = found.get("ingest", {}), args.images
    if (n, "floor") in ingest:
        out += [f"1. ingest of {n:,} images, 64x64 PNG and JPEG", markdown(ingest_table(ingest, n))]
        floor, stages = ingest[n, "floor"], ingest[n, "stages"]
        if "error" in floor or "error" in stages:
            failed.append(f"ingest at {n:,} images: {stages.get('error') or floor['error']}")
        else:
            x = floor["ingest"] / stages["ingest"]
            goal = TARGETS["ingest"]
            targets.append(target(f"ingest throughput >= {goal}x the floor", x, x >= goal))
            x = floor["ingest"] / (stages["ingest"] + stages["profile"])
            targets.append(
                target(f"ingest + profile throughput >= {goal}x the floor", x, x >= goal)
            )
        out.append("")
    if "memory" in args.parts and ingest:
        rows = memory_table(ingest, args.memory_scale)
        out += ["2. ingest peak memory by image count (data.engine=pandas)", markdown(rows), ""]
        failed += [f"memory at {r['images']} images: {r['note']}" for r in rows if r["note"]
                   and r["ingest RSS MiB"] == "-"]  # fmt: skip
        if len(rows) > 1 and rows[-1]["RSS / fewest"] != "-":
            x, goal = number(rows[-1]["RSS / fewest"]), TARGETS["memory"]
            what = f"ingest peak RSS at {rows[-1]['images']} / {rows[0]['images']} images <= {goal}"
            targets.append(target(what, x, x <= goal, ""))
    if "train" in found:
        rows = train_table(found["train"])
        out += [f"3. training, cnn_small, {args.epochs} epoch(s)", markdown(rows), ""]
        failed += [f"train {r['run']}: {r['note']}" for r in rows if r["images/s"] == "-"]
        rate = {r["run"]: number(r["images/s"]) for r in rows if r["images/s"] != "-"}
        for base in ("torch, 1 thread", "torch, default threads"):
            if "fit, local mode" in rate and base in rate:
                x, goal = rate["fit, local mode"] / rate[base], TARGETS["train"]
                targets.append(target(f"fit images/s >= {goal}x the loop ({base})", x, x >= goal))
    if "serve" in found:
        rows = serve_table(found["serve"])
        out += ["4. serving, one multipart upload per request", markdown(rows), ""]
        for r in rows:
            if r["(a) / best (b)"] and r["concurrency"] == str(TARGET_CONCURRENCY):
                x, goal = number(r["(a) / best (b)"]), TARGETS["serve"]
                what = f"bento images/s >= {goal}x FastAPI + torch at {TARGET_CONCURRENCY}"
                targets.append(target(what, x, x >= goal))
    if "predict" in found:
        bento = [r["rps"] for r in found.get("serve", []) if r["server"].startswith("(a)")]
        http = max(bento, default=0.0) or None
        rows = predict_table(found["predict"], http)
        out += ["5. batch scoring of the image folder (stages.predict, the bento)", markdown(rows)]
        out.append("")
        if http:
            x, goal = number(rows[0]["predict / http"]), TARGETS["predict"]
            targets.append(target(f"batch scoring >= {goal:g}x the HTTP service", x, x >= goal))
    if "accuracy" in found:
        accuracy, epochs = found["accuracy"]
        row = {"model": "cnn_small", "data": "digits_images", "epochs run": str(epochs)}
        row |= {"test accuracy": f"{accuracy:.4f}", "target": f">= {DIGITS_ACCURACY}"}
        out += ["6. accuracy", markdown([row | {"MLP, tabular digits": "0.985"}]), ""]
        what = f"digits_images cnn_small test accuracy >= {DIGITS_ACCURACY}"
        targets.append(target(what, accuracy, accuracy >= DIGITS_ACCURACY, ""))
    if found.get("int8"):
        out += ["INT8 against FP32 (each build's reports/compress.json; test split, 1 thread;"]
        out += ["accuracy judged on digits_images: the serving model trains for its speed only)"]
        out += [markdown(found["int8"]), ""]
        for r in found["int8"]:
            x, goal = number(r["INT8 / FP32 size"]), INT8_TARGETS["size"]
            targets.append(target(f"{r['model']}: INT8 size <= {goal}x FP32", x, x <= goal))
            if r["model"] in found.get("judged", ()):
                x, goal = number(r["drop points"]), INT8_TARGETS["accuracy"]
                what = f"{r['model']}: INT8 accuracy within {goal} points of FP32"
                targets.append(target(what, x, abs(x) <= goal, " points"))
            if r["compiled INT8 / FP32 eager"] != "-":
                x, goal = number(r["compiled INT8 / FP32 eager"]), INT8_TARGETS["latency"]
                what = f"{r['model']}: batch 64 compiled INT8 <= {goal}x FP32 eager"
                targets.append(target(what, x, x <= goal))
    out += ["Targets:", *[f"- {t}" for t in targets or ["none measured"]]]
    if failed:
        out += ["", "FAILED or NOT RUN:", *[f"- {f}" for f in failed]]
    return "\n".join(out), failed


# ---------------------------------------------------------------- main


def run_parts(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    found: dict[str, Any] = {"failed": []}
    found["ingest"] = ingest_runs(args, work)
    served = None
    if {"train", "serve", "predict"} & set(args.parts):
        stages = ("ingest", "profile", "train", "evaluate", "compress", "package")
        if not {"serve", "predict"} & set(args.parts):
            stages = ("ingest",)  # the curated images the training runs read
        root = image_set(args.train_images, work)
        overrides = ["data=images", f"data.path={root}", "data.bad_files=drop"]
        overrides += [f"train.epochs={args.epochs}", "compress.max_accuracy_drop=100"]
        name = f"images {args.train_images:,} {SIDE}x{SIDE}, cnn_small {args.epochs} epoch(s)"
        if args.smoke:  # one build for every part: the digits as image files (16x16 grey)
            overrides = ["data=digits_images", f"train.epochs={args.epochs}"]
            overrides += ["compress.max_accuracy_drop=100"]
            name = "digits_images cnn_small"
        served = build(
            name,
            [*overrides, *build_overrides(args)],
            work / "build",
            stages,
        )
        if (served.dir / "reports/compress.json").is_file():
            found["int8"] = [int8_row(served)]
        if "train" in args.parts:
            data = served.dir / "data/curated"
            if (data / "schema.json").is_file():
                found["train"] = train_runs(args, data, work)
            else:
                found["failed"].append(f"train: no curated data: {served.error}")
        if served.error:
            found["failed"].append(f"serve, predict not run: {served.error}")
        elif "package" in stages:
            if "serve" in args.parts:
                png = next(p for p in sorted(root.rglob("*.png")))
                try:
                    found["serve"] = serve_runs(served, png, args, work)
                except (SystemExit, Exception) as err:  # reported with the tables, not raised
                    found["failed"].append(f"serve: {type(err).__name__}: {err}")
            if "predict" in args.parts:
                got = predict_run(served, image_set(args.images, work), work, args)
                if "error" in got:
                    found["failed"].append(f"predict: {got['error']}")
                else:
                    found["predict"] = got
    if "digits" in args.parts:
        if args.smoke and served is not None and "compress" in served.seconds:
            digits = served  # the smoke's one build is of the digits
        else:
            digits = build(
                "digits_images cnn_small",
                ["data=digits_images", "model=cnn_small", *build_overrides(args)],
                work / "digits",
                ("ingest", "train", "evaluate", "compress"),
            )
        if digits.error:
            found["failed"].append(f"digits: {digits.error}")
        else:
            accuracy = json.loads((digits.dir / "metrics/eval.json").read_text())["accuracy"]
            ran = json.loads((digits.dir / "dvclive/train/metrics.json").read_text())["step"]
            found["accuracy"] = (accuracy, ran)
            if digits is not served:
                found.setdefault("int8", []).append(int8_row(digits))
            found["judged"] = {digits.name}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--images", type=int, default=50_000, help="images of (1) and (5)")
    parser.add_argument("--memory-scale", type=ints, default=[50_000, 200_000], help="of (2)")
    parser.add_argument("--train-images", type=int, default=5000, help="of (3), (4)'s model")
    parser.add_argument("--epochs", type=int, default=3, help="of (3) and (4)'s model")
    parser.add_argument("--concurrency", type=ints, default=[4, TARGET_CONCURRENCY])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per cell")
    parser.add_argument("--warmup", type=int, default=2, help="seconds per server and cell")
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (median kept)")
    parser.add_argument("--latency-repeats", type=int, default=10, help="compress's, per size")
    parser.add_argument("--memory-cap-gb", type=float, help="default: 80%% of available memory")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS))
    parser.add_argument("--keep", type=Path, help="keep the images, models and logs here")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE}: for the tests")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--augment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        vars(args).update(SMOKE)
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"--parts: unknown {unknown} ({', '.join(PARTS)})")
    if {"serve", "predict"} & set(args.parts) and not shutil.which("wrk"):
        sys.exit("error: wrk not found (apt-get install wrk)")
    available = psutil.virtual_memory().available
    args.memory_cap = (
        int(args.memory_cap_gb * 2**30) if args.memory_cap_gb else int(0.8 * available)
    )
    os.environ.pop("FULLSTACK_ML_API_TOKEN", None)  # no bearer auth: the FastAPI app has none
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-images-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        found = run_parts(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text, failed = report(args, found)
    print(text)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
