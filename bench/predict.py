"""Batch scoring benchmark: `python -m stages.predict` against the model called in process and
against the HTTP service, on synthetic rows of the default model's width.

For each table (`--tables`): `digits`, the default model on seeded synthetic rows of its width
and range (64 numbers 0-16); `mixed`, a model trained on `data=synthetic` (16 numbers, 4
categories of 6 strings, 1% missing) on more rows of that kind (another seed). Each model is
built by bench.serve's `build` (ingest, profile, train, compress, package with the current
conf/), then for each row count a Parquet file of the table's rows is scored three ways:
  (a) predict   `python -m stages.predict` in a process of its own on the file, with the bento:
                wall time from start to exit (imports, compiling the program, reading,
                checking, scoring, sampling for drift, writing), records/s, the stage's own
                scoring loop (its log line: without start-up), and the peak PSS of its
                process tree (sampled every 0.1 s); predictions + rejects = rows is checked
                from the files it wrote;
  (b) floor     in this process, the rows already in memory, through the preprocessing and the
                program on the path the serving plan picks (compiled where measured faster),
                plus softmax, in batches of 1024: records/s;
  (c) http      the bento under `bentoml serve`, wrk posting one record per request at each
                `--concurrency`, the best: records/s.
Prints per row count: (a) wall s, records/s, peak PSS; the ratios (a)/(b) and (a)/(c); and
the growth of peak PSS between the smallest and the largest row count.

    python -m bench.predict                       # both tables, 1M and 5M rows
    python -m bench.predict --rows 200000 --concurrency 8,64 --keep /tmp/bp
    python -m bench.predict --smoke               # mixed, 20k and 40k rows, 1 s of HTTP load
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.serve import ROOT, build, start, stop, wait_ready, wrk
from fullstack_ml.bento import free_port

BIN = Path(sys.executable).parent
FLOOR_BATCH = 1024
# the smoke: the mixed table only (categories and missing values: the longer path; a table
# more is a model built and a server started more, about 30 s of the suite)
SMOKE_ARGS = {
    "rows": [20_000, 40_000],
    "concurrency": [4],
    "duration": 1,
    "tables": ["mixed"],
    "engines": ["pandas"],  # engine=ray: tests/test_predict.py (its start-up: about 30 s here)
}
ROW_GROUP = 122_880  # rows per Parquet row group of the inputs (DuckDB's default; engine=ray
# reads a block per row group)
TARGETS = {"floor": 0.5, "http": 20.0, "memory": 1.5}  # the issue's: (a)/(b), (a)/(c), PSS


# The tables: the default model's (digits: 64 numbers 0-16) and a mixed-type one (a model
# trained on data=synthetic: 16 numbers, 4 categories of 6 strings, 1% missing values)
MIXED = ("data=synthetic", "profile=basic")  # digits' pixel-range constraints do not apply


def mixed_rows(rows: int, path: Path, seed: int = 1) -> None:
    """`rows` rows of the synthetic source's table (the training table's kind, another seed),
    written in row groups of ROW_GROUP rows."""
    from fullstack_ml.sources import synthetic_frame
    from fullstack_ml.stage import compose

    params = dict(compose(list(MIXED)).data.synthetic) | {"rows": rows}
    synthetic_frame(params, "label", seed).to_parquet(path, index=False, row_group_size=ROW_GROUP)


def synthetic_rows(rows: int, features: list[str], path: Path, seed: int = 0) -> None:
    """`rows` seeded rows of the features, integers 0-16 as floats, made and written 1M rows
    at a time (bounded memory) in row groups of ROW_GROUP rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([(f, pa.float64()) for f in features])
    with pq.ParquetWriter(path, schema) as writer:
        for start_at in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start_at)
            block = rng.integers(0, 17, size=(n, len(features))).astype(np.float64)
            table = pa.Table.from_pandas(pd.DataFrame(block, columns=features))
            writer.write_table(table, row_group_size=ROW_GROUP)


def peak_pss(proc: subprocess.Popen, every_s: float = 0.1) -> list[int]:
    """Start sampling the PSS of `proc` and its descendants; the list's one item is the
    peak so far (bytes), updated until the process exits."""
    import psutil

    peak = [0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except psutil.Error:  # a process ended between listing and reading
                pass
            peak[0] = max(peak[0], total)
            time.sleep(every_s)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def run_predict(bento: Path, data: Path, out: Path, env: dict, engine: str) -> dict[str, Any]:
    """(a): the stage as a user runs it alone (its metrics and report go to `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "python"), "-m", "stages.predict", f"predict.bento={bento}"]
    cmd += [f"predict.engine={engine}"]
    cmd += [f"predict.input.path={data}", f"predict.output={out / 'predictions.parquet'}"]
    cmd += [f"predict.rejects={out / 'rejects.csv'}", "predict.max_reject_rate=1.0"]
    began = time.perf_counter()
    with (out / "predict.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = peak_pss(proc)
        code = proc.wait()
    wall = time.perf_counter() - began
    if code != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {code}:\n{(out / 'predict.log').read_text()}")
    import pyarrow.parquet as pq

    predicted = pq.ParquetFile(out / "predictions.parquet").metadata.num_rows
    rejected = len(pd.read_csv(out / "rejects.csv"))
    # the stage's own line for its scoring loop (read, check, score, write, sample for drift)
    # rows of a table, files of an image folder; its rate is exact
    line = r"predict: ([\d,]+) (?:rows|files) in [\d.]+ s \(([\d,]+) (?:rows|files)/s\)"
    found = re.search(line, (out / "predict.log").read_text())
    rate = float(found.group(2).replace(",", "")) if found else float("nan")
    loop = float(found.group(1).replace(",", "")) / rate if found else float("nan")
    return {
        "wall": wall,
        "loop": loop,
        "pss": peak[0],
        "predicted": predicted,
        "rejected": rejected,
    }


def floor(model_dir: Path, data: Path, seconds: float) -> float:
    """(b): records/s of preprocessing + program + softmax on batches in memory."""
    import torch

    from fullstack_ml.runtime.meta import read_meta
    from fullstack_ml.runtime.preprocess import Preprocessor
    from fullstack_ml.runtime.program import load_runner

    pre = Preprocessor.from_dict(read_meta(model_dir)["preprocessing"])
    serving = json.loads((model_dir / "serving.json").read_text())
    runner = load_runner(model_dir, serving, pre.width)
    frame = pd.read_parquet(data)
    batches = [frame.iloc[i : i + FLOOR_BATCH] for i in range(0, len(frame), FLOOR_BATCH)]
    done, began = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - began < seconds:
            for batch in batches:
                torch.softmax(runner(torch.from_numpy(pre.encode_frame(batch))), dim=1).numpy()
                done += len(batch)
    return done / (time.perf_counter() - began)


def http(bento_tag: str, body: Path, concurrency: list[int], seconds: int, work: Path) -> float:
    """(c): the best records/s of `bentoml serve` over the concurrencies (1 record each)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("FULLSTACK_ML_API_TOKEN", None)
    port = free_port()
    cmd = [str(BIN / "bentoml"), "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/predict_proba"
    proc = start(cmd, env, work / "serve.log")
    try:
        wait_ready(proc, cmd, url, body, work / "serve.log")
        best = 0.0
        for c in concurrency:
            wrk(url, body, c, 1)  # warm-up at this concurrency
            best = max(best, wrk(url, body, c, seconds)["rps"])
        return best
    finally:
        stop(proc)


def table(name: str, results: list[dict[str, Any]], floor_rps: float, http_rps: float) -> str:
    out = [
        f"{name}: (b) floor, in process, batch {FLOOR_BATCH}: {floor_rps:,.0f} records/s; "
        f"(c) http, bentoml serve, best concurrency: {http_rps:,.0f} records/s",
        "",
        "| engine | rows | (a) wall s | (a) records/s | (a)/(b) | (a)/(c) | (a) loop s "
        "| loop/(b) | peak PSS GB | rows accounted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rps, loop_rps = r["rows"] / r["wall"], r["rows"] / r["loop"]
        accounted = r["predicted"] + r["rejected"] == r["rows"]
        out.append(
            f"| {r['engine']} | {r['rows']:,} | {r['wall']:.1f} | {rps:,.0f} | "
            f"{rps / floor_rps:.2f} | {rps / http_rps:.1f} | {r['loop']:.2f} | "
            f"{loop_rps / floor_rps:.2f} | "
            f"{r['pss'] / 1e9:.2f} | {'yes' if accounted else 'NO'} |"
        )
    out += [
        "",
        "(a) loop: the stage's own scoring loop (its `predict: N rows in S s` line): reading, "
        "checking, scoring, writing and sampling for drift, without start-up (imports, "
        "compiling the program) and the drift scores at the end.",
    ]
    for engine in dict.fromkeys(r["engine"] for r in results):
        runs = [r for r in results if r["engine"] == engine]
        first, last = runs[0], runs[-1]
        ratios = ", ".join(
            f"{r['rows']:,} rows {r['rows'] / r['wall'] / floor_rps:.2f} "
            f"(loop {r['rows'] / r['loop'] / floor_rps:.2f})"
            for r in runs
        )
        out.append(
            f"Targets, engine {engine}: (a)/(b) >= {TARGETS['floor']}: {ratios}; "
            f"(a)/(c) >= {TARGETS['http']}: {last['rows'] / last['wall'] / http_rps:.1f}; "
            f"peak PSS {last['rows']:,} / {first['rows']:,} rows <= {TARGETS['memory']}: "
            f"{last['pss'] / first['pss']:.2f}"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--rows", type=ints, default=[1_000_000, 5_000_000])
    parser.add_argument(
        "--tables", type=lambda s: s.split(","), default=["digits", "mixed"], help="of rows"
    )
    parser.add_argument(
        "--engines", type=lambda s: s.split(","), default=["pandas", "ray"], help="of (a)"
    )
    parser.add_argument("--concurrency", type=ints, default=[8, 32, 64], help="of (c)")
    parser.add_argument("--duration", type=int, default=5, help="seconds of (b) and each (c)")
    parser.add_argument("--keep", type=Path, help="keep the model, data and logs here")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_ARGS}, a tiny model")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE_ARGS)
    if not shutil.which("wrk"):
        sys.exit("error: wrk not found (apt-get install wrk)")
    if len(args.tables) > 1:  # a process per table: `bentoml build` imports service.py once
        # per process, and a second bento would pin the first one's model
        for name in args.tables:
            cmd = [sys.executable, "-m", "bench.predict", *sys.argv[1:], "--tables", name]
            if args.keep:
                cmd += ["--keep", str(args.keep / name)]
            print(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        return
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-predict-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml is imported
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    try:
        reports = [bench_table(name, args, work, env) for name in args.tables]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n\n".join(reports))


def bench_table(name: str, args: argparse.Namespace, work: Path, env: dict) -> str:
    """Build the table's model, score each row count with (a), then measure (b) and (c)."""
    built = build("default", 3, 1, work / name, args.smoke, MIXED if name == "mixed" else ())
    bento = work / name / "dist/fullstack_ml.bento"
    features = json.loads((built.model_dir / "model.json").read_text())["features"]
    results = []
    for rows in sorted(args.rows):
        data = work / f"{name}-{rows}.parquet"
        if name == "mixed":
            mixed_rows(rows, data)
        else:
            synthetic_rows(rows, features, data)
        for engine in args.engines:
            result = run_predict(bento, data, work / f"out-{name}-{rows}-{engine}", env, engine)
            results.append({"engine": engine, "rows": rows, **result})
            print(f"{name}: predict ({engine}) {rows:,} rows: {result}", file=sys.stderr)
    floor_rps = floor(built.model_dir, work / f"{name}-{min(args.rows)}.parquet", args.duration)
    http_rps = http(built.bento_tag, built.body, args.concurrency, args.duration, work / name)
    return table(name, results, floor_rps, http_rps)


if __name__ == "__main__":
    main()
