"""Ingest benchmark: the ingest and profile stages on a synthetic CSV against a bare pyarrow copy.

For each row count, a seeded synthetic table (`fullstack_ml.sources.synthetic_frame`: 40 float
features and 10 string features of 6 values, 1% of the values missing, a 4-class integer
label) is written once as a CSV with pyarrow (setup, not timed; generated in chunks of
CHUNK_ROWS rows with seeds seed, seed + 1, ... so setup memory stays bounded). Then, one
after the other, each in its own fresh Python process:
  (floor)  pyarrow.csv.read_csv of the CSV and pyarrow.parquet.write_table: nothing else;
  (pandas) `ingest` with data=file, data.engine=pandas, then `profile` with engine="pandas";
  (ray)    the same with data.engine=ray and engine="ray": a local Ray started in the process
           (its start is timed apart, then ingest and profile use it).
The configuration is conf/ composed with data=file, data.path=<csv>, data.engine=<engine> and
profile=basic (the default profile=digits holds the digits' pixel range [0, 16], which
normal features break); the data quality gates pass with their defaults (no duplicate rows,
no leaking feature, every category seen in train).

Reported per run: seconds to start Ray, to ingest and to profile, rows/s over their sum, the
whole process's wall time (imports and Ray shutdown included), the most processes in its
tree at once, and the peak memory of that tree (PSS: Ray's object store, shared memory
mapped by its processes, counts once). Then the ratios: time against the floor at the same
rows, and each path's peak memory at the most rows over the fewest (streaming: near 1).

    python -m bench.ingest --rows 1000000,5000000 --paths floor,pandas,ray
    python -m bench.ingest --smoke    # 2,000 rows, floor and pandas, a folder of its own
    python -m bench.ingest --smoke --paths floor,pandas,ray    # the Ray path too (+60 s here)
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("floor", "pandas", "ray")
SYNTHETIC = {  # data.synthetic: 50 feature columns and the label
    "numeric": 40,
    "categorical": 10,
    "categories": 6,
    "classes": 4,
    "missing_rate": 0.01,
}
CHUNK_ROWS = 500_000
SEED = 42
POLL_S = 0.2
TARGET_TIME = 2.0  # the Ray path's total time over the floor's, at most
TARGET_MEMORY = 1.25  # the Ray path's peak memory at the most rows over the fewest, at most
SMOKE_ROWS = [2000]
SMOKE_PATHS = ["floor", "pandas"]  # Ray's start alone took 60+ s of a 117 s smoke (2 cores)


# ---------------------------------------------------------------- setup (not timed)


def write_csv(rows: int, work: Path, keep: bool) -> Path:
    """The synthetic table of `rows` rows as a CSV in `work`, written once (or kept)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from fullstack_ml.sources import synthetic_frame

    shape = f"{SYNTHETIC['numeric']}n{SYNTHETIC['categorical']}c"
    path = work / f"synthetic-{rows}-{shape}-seed{SEED}.csv"
    if keep and path.is_file():
        print(f"setup: reusing {path}", file=sys.stderr)
        return path
    tmp = path.with_suffix(".csv.tmp")
    started = time.perf_counter()
    writer = None
    try:
        for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
            params = {**SYNTHETIC, "rows": min(CHUNK_ROWS, rows - start)}
            frame = synthetic_frame(params, "label", SEED + i)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            del frame
            if writer is None:
                writer = pcsv.CSVWriter(str(tmp), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    tmp.rename(path)
    size = path.stat().st_size / 2**20
    took = time.perf_counter() - started
    print(f"setup: wrote {path} ({size:.0f} MiB) in {took:.1f} s", file=sys.stderr)
    return path


# ---------------------------------------------------------------- the measured process


def run_floor(csv: Path, out: Path) -> dict[str, Any]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = pcsv.read_csv(csv)
    pq.write_table(table, out / "data.parquet")
    return {"rows": table.num_rows, "ingest": time.perf_counter() - started}


def run_stages(engine: str, csv: Path, out: Path) -> dict[str, Any]:
    """ingest then profile, as the pipeline runs them, with `engine`; Ray started first."""
    from fullstack_ml.paths import SPLITS
    from fullstack_ml.stage import compose
    from stages.ingest import ingest
    from stages.profile import profile

    overrides = ["data=file", f"data.path={csv}", f"data.engine={engine}", "profile=basic"]
    cfg = compose(overrides)
    result: dict[str, Any] = {}
    if engine == "ray":
        import logging

        import ray

        started = time.perf_counter()  # as ingest_ray starts it (address None: local)
        ray.init(address=None, include_dashboard=False, logging_level=logging.ERROR)
        result["startup"] = time.perf_counter() - started
    started = time.perf_counter()
    schema = ingest(cfg.data, cfg.seed, out / "data")
    result["ingest"] = time.perf_counter() - started
    splits = {name: out / "data" / f"{name}.parquet" for name in SPLITS}
    started = time.perf_counter()
    summary = profile(splits, schema, cfg.profile, out / "profile", engine=engine)
    result["profile"] = time.perf_counter() - started
    result["rows"] = sum(schema["rows"].values())
    result["split_rows"] = schema["rows"]
    result["constraints_passed"] = summary["constraints_passed"]
    if engine == "ray":
        ray.shutdown()
    return result


def child(path: str, csv: Path, out: Path) -> None:
    """The body of one measured process: prints one `RESULT {json}` line."""
    result = run_floor(csv, out) if path == "floor" else run_stages(path, csv, out)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- measuring a process tree


def tree(root: psutil.Process, sid: int) -> list[psutil.Process]:
    """The root, its descendants, and any process left in its session (reparented to init)."""
    procs = {root.pid: root}
    with contextlib.suppress(psutil.Error):
        procs.update({p.pid: p for p in root.children(recursive=True)})
    for p in psutil.process_iter():
        try:
            if p.pid not in procs and os.getsid(p.pid) == sid:
                procs[p.pid] = p
        except (OSError, psutil.Error):
            pass
    return list(procs.values())


def memory(procs: list[psutil.Process]) -> tuple[int, int]:
    """Summed PSS and RSS of `procs` in bytes; processes that ended meanwhile count 0."""
    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()  # /proc/PID/smaps_rollup: cheap
            pss, rss = pss + info.pss, rss + info.rss
        except psutil.Error:
            pass
    return pss, rss


def measure(path: str, csv: Path, out: Path, log: Path) -> dict[str, Any]:
    """Run one path in a fresh process; its result, wall time and peak tree memory.

    Memory is that of the whole process tree, polled every POLL_S: the Ray path runs its
    work in other processes (raylet, GCS, the workers running the tasks, the object store
    mapped in shared memory), so the driver's own memory would show only a small part of
    it. PSS is the sum that counts each shared page once (split among the processes that
    map it); RSS counts shared pages (libraries, the object store) once per process.
    """
    cmd = [sys.executable, "-m", "bench.ingest", "--child", path, "--csv", str(csv)]
    cmd += ["--out", str(out)]
    env = {**os.environ, "WHYLOGS_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    peak_pss = peak_rss = most = 0
    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(  # a file, not a pipe: Ray's workers may print a lot
            cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True
        )
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            procs = tree(root, proc.pid)
            pss, rss = memory(procs)
            peak_pss, peak_rss, most = max(peak_pss, pss), max(peak_rss, rss), max(most, len(procs))
            time.sleep(POLL_S)
    wall = time.perf_counter() - started
    output = log.read_text(errors="replace").splitlines()
    lines = [x for x in output if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(output[-30:])
        sys.exit(f"error: the {path} run exited with {proc.returncode} (log {log}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result.setdefault("startup", 0.0)
    result.setdefault("profile", 0.0)
    result["total"] = result["startup"] + result["ingest"] + result["profile"]
    result.update(process=wall, peak_pss=peak_pss / 2**20, peak_rss=peak_rss / 2**20)
    result["processes"] = most
    return result


# ---------------------------------------------------------------- report


def table(results: dict[tuple[int, str], dict[str, Any]], rows: list[int]) -> str:
    """The runs and the ratios as markdown tables, then the targets."""
    dash = "-"
    out = [
        "| rows | path | ray start s | ingest s | profile s | total s | rows/s | process s"
        " | processes | peak PSS MiB | peak RSS MiB | time / floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (n, path), r in results.items():
        floor = results.get((n, "floor"))
        ratio = f"{r['total'] / floor['total']:.2f}" if floor else dash
        start = f"{r['startup']:.2f}" if path == "ray" else dash
        prof = f"{r['profile']:.2f}" if path != "floor" else dash
        out.append(
            f"| {n:,} | {path} | {start} | {r['ingest']:.2f} | {prof} | {r['total']:.2f}"
            f" | {n / r['total']:,.0f} | {r['process']:.1f} | {r['processes']}"
            f" | {r['peak_pss']:,.0f}"
            f" | {r['peak_rss']:,.0f} | {ratio} |"
        )
    lo, hi = min(rows), max(rows)
    growth: dict[str, float] = {}
    if hi > lo:
        out += [
            "",
            f"| path | peak PSS {hi:,} / {lo:,} rows | peak RSS {hi:,} / {lo:,} rows |",
            "|---|---:|---:|",
        ]
        for path in PATHS:
            a, b = results.get((lo, path)), results.get((hi, path))
            if a and b:
                growth[path] = b["peak_pss"] / a["peak_pss"]
                out.append(f"| {path} | {growth[path]:.2f} | {b['peak_rss'] / a['peak_rss']:.2f} |")
    out += ["", "Targets:"]
    for n in rows:
        ray, floor = results.get((n, "ray")), results.get((n, "floor"))
        if ray and floor:
            x = ray["total"] / floor["total"]
            met = "met" if x <= TARGET_TIME else "NOT met"
            out.append(
                f"- ray total time within {TARGET_TIME:g}x of the floor at {n:,} rows:"
                f" {x:.2f}x ({met})"
            )
    if "ray" in growth:
        met = "met" if growth["ray"] <= TARGET_MEMORY else "NOT met"
        out.append(
            f"- ray peak memory (PSS) not growing with rows, {hi:,} / {lo:,} <= "
            f"{TARGET_MEMORY:g}: {growth['ray']:.2f} ({met})"
        )
    if len(out) and out[-1] == "Targets:":
        out.append("- not measured: needs the ray and floor paths (and two row counts)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--rows", default=[1_000_000, 5_000_000], type=ints, help="row counts")
    parser.add_argument("--paths", type=lambda s: s.split(","), help="default floor,pandas,ray")
    parser.add_argument(
        "--work", type=Path, help="where the CSVs and outputs go (default: TMPDIR/bench-ingest)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the CSVs, and reuse kept ones")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_ROWS} rows: seconds")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.csv, args.out)
    if args.smoke:  # a folder of its own: test runs side by side do not share the CSV
        args.rows, args.paths = SMOKE_ROWS, args.paths or SMOKE_PATHS
        args.work = args.work or Path(tempfile.mkdtemp(prefix="bench-ingest-smoke-"))
    args.paths = args.paths or list(PATHS)
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"--paths: unknown {unknown} ({', '.join(PATHS)})")
    work = (args.work or Path(tempfile.gettempdir()) / "bench-ingest").resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[int, str], dict[str, Any]] = {}
    csvs, logs = [], []
    try:
        for n in args.rows:
            csv = write_csv(n, work, args.keep)
            csvs.append(csv)
            for path in [p for p in PATHS if p in args.paths]:
                out, log = work / f"out-{n}-{path}", work / f"{n}-{path}.log"
                shutil.rmtree(out, ignore_errors=True)
                logs.append(log)
                try:
                    r = measure(path, csv, out, log)
                finally:
                    shutil.rmtree(out, ignore_errors=True)  # a 5M curated output is large
                if r["rows"] != n:
                    sys.exit(f"error: the {path} run saw {r['rows']} rows, not {n}")
                results[n, path] = r
                print(f"{n} {path}: {json.dumps(r)}", file=sys.stderr)
    finally:
        if not args.keep:
            for file in csvs + logs:
                file.unlink(missing_ok=True)
            if not any(work.iterdir()):
                work.rmdir()
    print(table(results, args.rows))


if __name__ == "__main__":
    main()
