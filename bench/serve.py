"""Serving benchmark: the project's BentoML service against what a user would write instead.

For each model it compares, at each concurrency, with wrk as the load generator (a separate
process) posting one JSON record per request (`--records` changes it):
  (a) the bento built by the package stage, served by `bentoml serve` (its own batching),
      POST /predict_proba: label and class probabilities;
  (b) bench/fastapi_app.py on one uvicorn worker, one model call per request, the same
      answer from a `def` route and from an `async def` route; the ratios take the better;
  (c) the model called in process on batches of 1024 records: the upper limit, in records/s.
Each server is warmed up at each concurrency before it is measured. The models are built in
a temporary directory by the stage functions (ingest, profile, train, compress, package)
with the current conf/ and service.py; a model other than the default trains for a few
epochs only and skips the compress accuracy budget (accuracy does not matter here). Only
the configured compression method is built: the report's other candidates
(`compress.pipelines`) are not served, so they are not built (nor the distil stage's student).

    python -m bench.serve --models default,mlp_xl --duration 10 --concurrency 1,8,64
    python -m bench.serve --smoke     # the default model trained 1 epoch, 1 s cells: seconds
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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fullstack_ml.bento import free_port, raw_records

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LUA = Path(__file__).with_name("post.lua")
IN_PROCESS_BATCH = 1024
SMOKE_BUILD = [  # the smoke's model: 1 epoch in Ray Train's local mode, eager only
    "train.epochs=1",
    "train.num_workers=0",
    "compress.compile=false",
    "compress.max_accuracy_drop=100",
    "outliers.candidates=[mahalanobis]",  # the served detector alone (PyOD's: measured only)
]
SMOKE_ARGS = {"models": ["default"], "duration": 1, "warmup": 1, "concurrency": [4], "rounds": 1}


@dataclass
class Built:
    model_dir: Path  # model.pt2 and schema.json
    bento_tag: str
    body: Path  # the request body file


def overrides_for(model: str, epochs: int, smoke: bool = False) -> list[str]:
    """Config overrides of a bench model: the default as configured, others shrunk; the
    configured compression method only (`++`: whether or not conf/ has the key)."""
    quick = ["compress.latency_repeats=5", "++compress.pipelines=null"]
    if smoke:
        return [*quick, *SMOKE_BUILD]
    if model == "default":
        return quick
    return [f"model={model}", f"train.epochs={epochs}", "compress.max_accuracy_drop=100", *quick]


def build(
    model: str, epochs: int, records: int, work: Path, smoke: bool = False, extra: tuple = ()
) -> Built:
    """Ingest, profile, train, compress and package `model` under `work` with the stages
    (`extra`: more config overrides, e.g. another data set)."""
    from fullstack_ml.curated import load_split
    from fullstack_ml.model import encode_split, load_fp32
    from fullstack_ml.paths import SPLITS
    from fullstack_ml.stage import compose, git_commit
    from stages.compress import compress
    from stages.ingest import ingest
    from stages.package import package
    from stages.profile import profile
    from stages.train import train

    cfg = compose([*overrides_for(model, epochs, smoke), *extra])
    data, fp32, out = work / "data", work / "fp32", work / "compressed"
    if not (out / "reference_profile.bin").is_file():  # else kept (--keep) from an earlier run
        schema = ingest(cfg.data, cfg.seed, data)
        splits = {name: load_split(name, data) for name in SPLITS}
        profile(splits, schema, cfg.profile, work / "profile")
        train(cfg, data, fp32)
        _, meta = load_fp32(fp32)
        val_x, _ = encode_split(splits["val"], meta)
        test_xy, odd = encode_split(splits["test"], meta), (splits, cfg.outliers)
        result = compress(fp32, val_x, test_xy, cfg.compress, out, outliers=odd)
        (out / "serving.json").write_text(json.dumps(result["serving"]))
        shutil.copyfile(data / "schema.json", out / "schema.json")
        shutil.copyfile(work / "profile" / "train.bin", out / "reference_profile.bin")
    names = ("model.pt2", "model.json", "schema.json", "reference_profile.bin", "serving.json")
    names += ("model.onnx",) if (out / "model.onnx").exists() else ()  # compress.runtimes
    names += ("outliers.json",)  # the outlier detector
    meta = {"git_commit": git_commit()}
    info = package({n: out / n for n in names}, meta, cfg.serve, work / "dist")
    features = [f["name"] for f in json.loads((out / "schema.json").read_text())["features"]]
    rows = raw_records(load_split("test", data).head(records), features)  # as JSON sends them
    body = work / "body.json"
    body.write_text(json.dumps({"records": rows}))
    return Built(out, info["bento_tag"], body)


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(proc: subprocess.Popen, cmd: list[str], url: str, body: Path, log: Path) -> None:
    """Wait until the server answers a prediction with 200; exit naming it if it never does."""
    for _ in range(240):
        if proc.poll() is not None:
            sys.exit(f"error: {' '.join(cmd)} exited:\n{log.read_text()}")
        try:
            if post(url, body.read_bytes()) == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    sys.exit(f"error: {' '.join(cmd)} not ready after 120 s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s; nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def wrk(
    url: str, body: Path, connections: int, duration: int, script: Path = LUA
) -> dict[str, float]:
    """One wrk run: 2xx requests/s, latency percentiles (ms), non-2xx and socket errors.
    `script`: the Lua script posting `body` (bench/post.lua: JSON)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    cmd += ["-s", str(script), url, "--", str(body)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    r = json.loads(line[4:])
    return {
        "rps": (r["requests"] - r["non2xx"]) / (r["duration_us"] / 1e6),
        "p50": r["p50_us"] / 1e3,
        "p99": r["p99_us"] / 1e3,
        "non2xx": r["non2xx"],
        "socket": r["connect"] + r["read"] + r["write"] + r["timeout"],
    }


def in_process(model_file: Path, body: Path, duration: float) -> float:
    """Records/s of the model (and softmax) called on batches of IN_PROCESS_BATCH records."""
    import torch

    from fullstack_ml.runtime.program import load_program

    model = load_program(model_file)
    rows = json.loads(body.read_text())["records"]
    x = torch.tensor([list(rows[i % len(rows)].values()) for i in range(IN_PROCESS_BATCH)])
    done = 0
    with torch.inference_mode():
        torch.softmax(model(x), dim=1)  # warm-up
        start_at = time.perf_counter()
        while time.perf_counter() - start_at < duration:
            torch.softmax(model(x), dim=1).tolist()
            done += IN_PROCESS_BATCH
    return done / (time.perf_counter() - start_at)


def bench_model(model: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Rows of results of one model: one per (server, concurrency), then the in-process one."""
    built = build(model, args.epochs, args.records, work / model, args.smoke)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BENTOML_DO_NOT_TRACK": "true"}
    env["BENCH_MODEL_DIR"] = str(built.model_dir)
    env.pop("FULLSTACK_ML_API_TOKEN", None)  # no bearer auth: (b) has none either
    if args.bentoml_config:
        env["BENTOML_CONFIG"] = str(Path(args.bentoml_config).resolve())
    servers = {  # name -> command, and the label of each route measured (same answers)
        "bentoml": (
            [str(BIN / "bentoml"), "serve", built.bento_tag],
            {"(a) bentoml": "/predict_proba"},
        ),
        "fastapi": (
            [str(BIN / "python"), "-m", "uvicorn", "bench.fastapi_app:app"],
            {"(b) fastapi def": "/predict_proba", "(b) fastapi async def": "/predict_proba_async"},
        ),
    }
    urls, procs, starting = {}, [], []
    try:
        for name, (cmd, routes) in servers.items():  # started together, then waited for
            port = free_port()
            base, log = f"http://127.0.0.1:{port}", work / model / f"{name}.log"
            cmd = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
            procs.append(start(cmd, env, log))
            starting.append((procs[-1], cmd, base + next(iter(routes.values())), log))
            print(f"{model}: {name} on port {port}, log {log}", file=sys.stderr)
            urls.update({label: base + route for label, route in routes.items()})
        for proc, cmd, url, log in starting:
            wait_ready(proc, cmd, url, built.body, log)
        rows = []
        for c in args.concurrency:
            for url in urls.values():  # steady state at this concurrency
                wrk(url, built.body, c, args.warmup)
            runs: dict[str, list[dict[str, float]]] = {label: [] for label in urls}
            for _ in range(args.rounds):  # alternate the servers: shared cores drift
                for label, url in urls.items():
                    runs[label].append(wrk(url, built.body, c, args.duration))
            for label, results in runs.items():
                median = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
                rows.append({"model": model, "server": label, "c": c, **median})
                print(f"{model} {label} c={c}: {median}", file=sys.stderr)
    finally:
        for proc in procs:
            stop(proc)
    rps = in_process(built.model_dir / "model.pt2", built.body, args.duration)
    rows.append({"model": model, "server": f"(c) in process, batch {IN_PROCESS_BATCH}", "rps": rps})
    return rows


def table(rows: list[dict[str, Any]], targets: dict[str, float]) -> str:
    """The results and the ratios as markdown tables; (b) is the better FastAPI route."""
    out = [
        "| model | server | concurrency | req/s (2xx) | p50 ms | p99 ms | non-2xx | socket err |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "c" in r:
            out.append(
                f"| {r['model']} | {r['server']} | {r['c']} | {r['rps']:.0f} | {r['p50']:.1f}"
                f" | {r['p99']:.1f} | {r['non2xx']} | {r['socket']} |"
            )
        else:
            out.append(f"| {r['model']} | {r['server']} | | {r['rps']:.0f} records/s | | | | |")
    out += [
        "",
        "| model | concurrency | (a)/(b) req/s | target | (a)/(c) | p99 (a) ms | p99 (b) ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a in (r for r in rows if r["server"].startswith("(a)")):
        model, c = a["model"], a["c"]
        b = [
            r for r in rows if r["model"] == model and r.get("c") == c and r["server"][:3] == "(b)"
        ]
        limit = next(r for r in rows if r["model"] == model and r["server"].startswith("(c)"))
        b_rps, b_p99 = max(r["rps"] for r in b), min(r["p99"] for r in b)
        target = f">= {targets[model]:g}" if model in targets and c == 64 else ""
        out.append(
            f"| {model} | {c} | {a['rps'] / b_rps:.2f} | {target}"
            f" | {a['rps'] / limit['rps']:.3f} | {a['p99']:.1f} | {b_p99:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--models", default="default,mlp_xl", type=lambda s: s.split(","))
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell")
    parser.add_argument("--concurrency", type=ints, default=[1, 8, 64])
    parser.add_argument("--warmup", type=int, default=2, help="seconds per server and cell")
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (median kept)")
    parser.add_argument(
        "--records", type=int, default=1, help="records per request (<= serve.max_records)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="for models other than default")
    parser.add_argument("--bentoml-config", help="a BentoML configuration YAML for (a)")
    parser.add_argument("--keep", type=Path, help="keep the built models and logs here")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_ARGS}, a tiny model")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE_ARGS)
    if not shutil.which("wrk"):
        sys.exit("error: wrk not found (apt-get install wrk)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(work.resolve() / "bentoml")  # before bentoml is imported
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    try:
        rows = [row for model in args.models for row in bench_model(model, args, work)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows, {"default": 1.0, "mlp_xl": 1.5}))


if __name__ == "__main__":
    main()
