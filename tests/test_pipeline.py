"""End to end: `dvc exp run` in a temporary git repo, then the bento served over HTTP."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests

from fullstack_ml.bento import serve_bento
from fullstack_ml.stage import ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SHRUNK = ["train.epochs=6", "distil.epochs=4", "compress.latency_repeats=5"]
SHRUNK += ["serve.slo.duration_s=1", "serve.slo.p99_ms=60000", "serve.slo.min_rps=1"]  # see below
SHRUNK += ["serve.slo.burst_s=1", "serve.slo.settle_s=0.5", "serve.slo.max_after_burst_ratio=100"]
SHRUNK += ["~compress.pipelines"]  # the report's candidates: tests/test_compress.py
SHRUNK += ["outliers.candidates=[mahalanobis,max_softmax,energy]"]  # PyOD's: test_outliers.py
# the default run's report: the distil stage's student, quantized; the student learns from
# the teacher's soft labels alone (alpha=1: the true labels carry no weight)
DISTIL = [*SHRUNK, "+compress.pipelines={distil_int8: [distil, int8_static]}"]
DISTIL += ["distil.alpha=1.0", "distil.epochs=8"]
# eager only: this repo's bento is served 6 times here. The mixed pipeline below keeps
# Inductor (served compiled where its plan measured that faster, and checked row by row by its
# validate stage); tests/test_compress.py checks the compiled paths in process.
DISTIL += ["compress.compile=false"]

# A regression target, categorical features, missing values and column names that are not
# Python identifiers (the service exposes each feature by its own name), from a CSV file.
MIXED = [
    "data=csv",
    "data.path=data/raw/mixed.csv",
    "data.target=label",
    "profile=basic",  # digits' pixel range does not apply
    "compress.max_accuracy_drop=5",  # R^2 points; parity, not the budget, is tested here
    "distil.epochs=2",
]
MIXED_DATA = {"rows": 3000, "numeric": 16, "categorical": 4, "categories": 6, "classes": 0}
MIXED_DATA["missing_rate"] = 0.05
ODD_NAMES = {"num_0": "sepal.length", "num_1": "_id", "num_2": "model_config", "cat_1": "records"}


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("bentoml")
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BENTOML_HOME": str(home)}


def new_repo(tmp_path_factory: pytest.TempPathFactory, env: dict) -> Path:
    """A git repo holding the project's files (committed or not, as git would see them)."""
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT, env).stdout.split()
    repo = tmp_path_factory.mktemp("repo")
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    sh(["git", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo, env)
    return repo


def exp_run(overrides: list[str]) -> list[str]:
    return ["dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)]]


@pytest.fixture(scope="module")
def mixed_run(
    tmp_path_factory: pytest.TempPathFactory, env: dict
) -> Iterator[tuple[Path, subprocess.Popen]]:
    """The mixed-types regression pipeline, started in the background (its own BentoML
    store) before the default one: most stages use one core of two, so the two runs
    overlap. test_mixed_types_regression_served_like_in_process waits for it."""
    from fullstack_ml.sources import synthetic_frame

    repo = new_repo(tmp_path_factory, env)
    frame = synthetic_frame(MIXED_DATA, "label", seed=42).rename(columns=ODD_NAMES)
    frame.to_csv(repo / "data/raw/mixed.csv", index=False)
    sh(["git", "add", "data/raw/mixed.csv"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"], repo, env)
    own = {**env, "BENTOML_HOME": str(repo.parent / "bentoml-mixed")}
    with (repo.parent / "mixed.log").open("w") as log:
        proc = subprocess.Popen(
            exp_run([*SHRUNK, *MIXED]), cwd=repo, env=own, stdout=log, stderr=subprocess.STDOUT
        )
    yield repo, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, env: dict, mixed_run: tuple[Path, subprocess.Popen]
) -> Path:
    """The default pipeline (digits), shrunk (`mixed_run`: started first, to overlap)."""
    repo = new_repo(tmp_path_factory, env)
    sh(exp_run(DISTIL), repo, env)
    return repo


def test_pipeline_outputs_metrics_and_experiments(repo: Path, env: dict) -> None:
    for out in [
        "data/curated/train.parquet",
        "reports/profile/train.bin",
        "reports/profile/report.html",
        "models/fp32/model.pt",
        "models/student/model.pt",
        "plots/confusion.csv",
        "dvclive/train/plots/metrics/val_accuracy.tsv",
        "dvclive/distil/plots/metrics/val_loss.tsv",
        "models/compressed/model.pt2",
        "dist/bento.json",
        "reports/build.html",
        "data/predictions/predictions.parquet",
        "reports/predict.html",
    ]:
        assert (repo / out).is_file(), out
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    values = next(iter(metrics.values()))["data"]
    assert values["metrics/eval.json"]["data"]["accuracy"] > 0.85
    compressed = values["metrics/compress.json"]["data"]
    assert compressed["size_ratio"] < 0.3
    # the headline figures only (what `dvc exp show` compares); the details beside them
    assert len(compressed) == 10 and "per_class" not in values["metrics/eval.json"]["data"]
    # the budget's evidence: the drop's upper bound on val+test, paired with FP32
    assert compressed["accuracy_drop_points"] <= compressed["accuracy_drop_bound"]
    per_class = pd.read_csv(repo / "plots/per_class.csv")
    assert list(per_class["class"]) == list(range(10)) and per_class["support"].sum() == 270
    # distil -> compress through DVC
    student = json.loads((repo / "reports/compress.json").read_text())["candidates"]["distil_int8"]
    assert student["steps"] == ["distil", "int8_static"] and student["size_ratio"] < 0.1
    # DVCLive's per-epoch curves and summary (train: local mode, in the stage's process)
    live = values["dvclive/train/metrics.json"]["data"]
    assert live["step"] == 6 and 1 <= live["best_epoch"] <= 6
    # the headline figures only: what `dvc exp show` compares (details: outputs and plots)
    assert sum(len(flat(f["data"])) for f in values.values()) == 40
    scored = values["metrics/predict.json"]["data"]  # batch scoring of the test split
    assert scored["predicted"] == 270 and scored["rejected"] == 0
    curve = pd.read_csv(repo / "dvclive/train/plots/metrics/val_accuracy.tsv", sep="\t")
    assert list(curve["step"]) == list(range(1, 7)) and curve["val_accuracy"].max() > 0.8
    shown = sh(["dvc", "plots", "show", "--json"], repo, env).stdout  # read again below
    assert "Loss per epoch" in shown and "val_loss.tsv" in shown
    distil = values["metrics/distil.json"]["data"]
    assert distil["parameter_ratio"] < 0.1 and len(distil) == 3  # the headline figures
    assert distil["student_accuracy"] > 0.8  # 10 classes: chance is 0.1
    # the release gate served the bento and checked every test answer; its latency SLOs are
    # relaxed here (a shared test machine), test_failed_stage... checks that a miss fails
    validate = values["metrics/validate.json"]["data"]
    assert validate["answers_checked"] == 270 and validate["error_rate"] == 0
    assert validate["after_burst_ratio"] > 0 and len(validate) == 6  # the headline figures
    # the served outliers on test: as many as batch scoring's, and the gate's verdict
    assert validate["outliers"] == values["metrics/predict.json"]["data"]["outliers"]
    details = json.loads((repo / "reports/validate.json").read_text())  # every figure
    assert details["burst_error_rate"] == 0 and details["p99_ms"] == validate["p99_ms"]
    assert details["outlier_gate"]["over"] is False
    exps = sh(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "train.epochs" in exps or '"epochs": 6' in exps
    # nothing changed: nothing reruns (a serve key rebuilds only the bento: the sweep below)
    again = sh(["dvc", "repro"], repo, env)
    assert "Running stage" not in again.stdout
    plots = json.loads(shown)["data"]  # what `dvc plots show` gave above: nothing reran since
    assert {"Loss per epoch", "Accuracy per epoch", "Confusion matrix (test split)"} <= set(plots)
    loss = json.dumps(plots["Loss per epoch"][0]["content"])
    assert loss.count('"val_loss"') >= 6  # one value per epoch


def test_a_code_edit_makes_stale_exactly_the_stages_that_import_it(repo: Path, env: dict) -> None:
    """The build's promise on the real `dvc status`: an edit reruns the stages whose import
    closure holds the file (tests/test_layout.py checks every file; these are samples)."""
    expected = {
        "stages/ingest/gates.py": {"ingest"},  # a module of one stage
        "fullstack_ml/train_worker.py": {"train", "distil"},  # the shared training loop
        "fullstack_ml/runtime/drift.py": {"profile", "package", "predict", "report"},  # bento
        "service.py": {"package"},
    }
    assert json.loads(sh(["dvc", "status", "--json"], repo, env).stdout) == {}
    for name, stages in expected.items():
        original = (repo / name).read_bytes()
        (repo / name).write_bytes(original + b"# an edit\n")
        try:
            stale = json.loads(sh(["dvc", "status", "--json"], repo, env).stdout)
        finally:
            (repo / name).write_bytes(original)
        assert set(stale) == stages, name


@pytest.mark.parametrize(
    ("stage", "override", "message", "kept"),
    [
        (
            "compress",
            "compress.max_accuracy_drop=-100",
            "over the budget compress.max_accuracy_drop=-100",
            "models/compressed/model.pt2",
        ),
        (
            "profile",
            "profile.constraints.feature_range=[0,8]",
            "profile.constraints failed on the train split",
            "reports/profile/train.bin",
        ),
        (
            "validate",
            # a throughput floor no server meets, under a short load (all of it is checked)
            "serve.slo.min_rps=1000000 serve.slo.duration_s=1 serve.slo.burst_s=0.5",
            "serve.slo: throughput",
            "metrics/validate.json",
        ),
    ],
)
def test_failed_stage_reports_one_line_and_keeps_outputs(
    repo: Path, env: dict, stage: str, override: str, message: str, kept: str
) -> None:
    before = (repo / kept).read_bytes()
    proc = sh([sys.executable, "-m", f"stages.{stage}", *override.split()], repo, env, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert (repo / kept).read_bytes() == before


def test_queued_sweep_runs_every_value(repo: Path, env: dict) -> None:
    """Hydra sweep syntax queues one experiment per value. A serving key is swept: 256 is
    the baseline's value (nothing reruns), 512 reruns package and validate only, the rest
    coming from DVC's run cache (a train.lr sweep works the same, slower)."""
    sweep = [*DISTIL, "serve.max_batch_size=256,512"]
    sh([*exp_run(sweep), "--queue"], repo, env)
    sh(["dvc", "queue", "start", "--jobs", "2"], repo, env)  # both at once
    for _ in range(600):  # a guard against a hung queue, not a speed check
        status = sh(["dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status
    names = [line.split()[1] for line in status.splitlines() if "Success" in line]
    logs = [sh(["dvc", "queue", "logs", name], repo, env).stdout for name in names]
    ran = sorted(
        [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]
        for log in logs
    )
    assert ran == [[], ["package", "validate", "report"]], logs
    exps = json.loads(sh(["dvc", "exp", "show", "--json"], repo, env).stdout)
    runs = {
        rev["data"]["params"]["params.yaml"]["data"]["serve"]["max_batch_size"]: rev
        for commit in exps
        for exp in commit.get("experiments") or []
        for rev in exp["revs"][:1]
    }
    assert {256, 512} <= set(runs)
    for value in (256, 512):
        metrics = runs[value]["data"]["metrics"]
        assert metrics["metrics/compress.json"]["data"]["size_ratio"] < 0.3
        assert metrics["metrics/validate.json"]["data"]["error_rate"] == 0


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[str]:
    """`bentoml serve` of the exported bento file, extracted, with an empty model store."""
    info = json.loads((repo / "dist/bento.json").read_text())
    with serve_bento(repo / "dist" / info["file"]) as server:
        yield server.url


def test_served_predictions_match_the_compressed_model(repo: Path, server: str) -> None:
    from fullstack_ml.model import encode_split, predict_logits
    from fullstack_ml.runtime.program import load_program

    test = pd.read_parquet(repo / "data/curated/test.parquet")
    features = [c for c in test.columns if c != "target"]
    records = test[features].head(20).to_dict("records")
    r = requests.post(f"{server}/predict", json={"records": records}, timeout=30)
    assert r.status_code == 200, r.text
    served = r.json()
    model = load_program(repo / "models/compressed/model.pt2")
    meta = json.loads((repo / "models/compressed/model.json").read_text())
    expected = predict_logits(model, encode_split(test.head(20), meta)[0]).argmax(1)
    assert [p["label"] for p in served] == expected.tolist()
    r = requests.post(f"{server}/predict_proba", json={"records": records}, timeout=30)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in r.json())
    meta = requests.get(f"{server}/metadata", timeout=10).json()
    assert meta["metrics"]["eval"]["accuracy"] > 0.85 and len(meta["git_commit"]) == 40
    assert meta["release"] is None  # served from dist/, not fetched as a release
    assert requests.get(f"{server}/metrics", timeout=10).status_code == 200


def test_mixed_types_regression_served_like_in_process(
    mixed_run: tuple[Path, subprocess.Popen],
) -> None:
    """Train/serve parity on raw values: the validate stage sends every test row (numbers
    with gaps as null, category strings) to the served bento and compares each value with
    the compressed model's in process; here the same for a record with unseen values."""
    from fullstack_ml.bento import raw_records
    from fullstack_ml.model import decode, encode_split, predict_logits
    from fullstack_ml.runtime.program import load_program

    repo, proc = mixed_run
    if proc.wait() != 0:
        log = (repo.parent / "mixed.log").read_text()[-4000:]
        pytest.fail(f"dvc exp run (mixed) exited {proc.returncode}:\n{log}")
    schema = json.loads((repo / "data/curated/schema.json").read_text())
    assert schema["task"] == "regression"
    assert {f["kind"] for f in schema["features"]} == {"numeric", "categorical"}
    assert set(ODD_NAMES.values()) <= {f["name"] for f in schema["features"]}
    validate = json.loads((repo / "metrics/validate.json").read_text())
    assert validate["answers_checked"] == schema["rows"]["test"]
    assert json.loads((repo / "metrics/eval.json").read_text())["r2"] > 0.8
    meta = json.loads((repo / "models/compressed/model.json").read_text())
    test = pd.read_parquet(repo / "data/curated/test.parquet").head(8)
    test.loc[test.index[:4], "cat_0"] = "never-seen"
    test.loc[test.index[2:6], "num_3"] = None
    model = load_program(repo / "models/compressed/model.pt2")
    want = decode(predict_logits(model, encode_split(test, meta)[0]), meta)
    info = json.loads((repo / "dist/bento.json").read_text())
    with serve_bento(repo / "dist" / info["file"]) as server:
        body = {"records": raw_records(test, meta["features"])}
        served = requests.post(f"{server.url}/predict", json=body, timeout=30)
        proba = requests.post(f"{server.url}/predict_proba", json=body, timeout=30)
        bad = {"records": [{**body["records"][0], "sepal.length": "x"}]}
        refused = requests.post(f"{server.url}/predict", json=bad, timeout=30)
    assert served.status_code == 200, served.text
    # served compiled by Inductor: INT8 rounding differs from eager's by about 1e-4 relative
    assert [p["value"] for p in served.json()] == pytest.approx(want.tolist(), rel=1e-3)
    assert proba.status_code == 400 and "regression" in proba.text
    assert refused.status_code == 400, refused.text  # the error names the feature as sent
    assert refused.json()["detail"][0]["loc"] == ["records", 0, "sepal.length"]


def test_failed_ingest_under_dvc_leaves_nothing_valid_and_checkout_restores(
    repo: Path, env: dict
) -> None:
    """`dvc repro` deletes a stage's outputs before running it: a failed ingest leaves no
    split behind, and `dvc checkout` brings the last good one back from the cache."""
    import yaml

    before = (repo / "data/curated/train.parquet").read_bytes()
    text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["data"]["split"]["strategy"] = "alphabetical"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = sh(["dvc", "repro", "ingest"], repo, env, check=False)
        assert proc.returncode != 0
        assert "data.split.strategy: 'alphabetical' is not" in proc.stderr + proc.stdout
        assert not list((repo / "data").glob("curated/*.parquet"))
    finally:
        (repo / "params.yaml").write_text(text)
    sh(["dvc", "checkout", "data/curated"], repo, env)
    assert (repo / "data/curated/train.parquet").read_bytes() == before
    assert "Running stage" not in sh(["dvc", "repro"], repo, env).stdout


def flat(data: dict, prefix: str = "") -> dict:
    """Nested metrics as dotted keys, as `dvc exp show` makes columns of them."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def figures(page: str) -> dict[str, object]:
    """The metrics figures a report shows: `data-metric` name -> its exact `data-value`."""
    cells = re.findall(r"data-metric='([^']+)' data-value='([^']*)'", page)
    return {name: json.loads(html.unescape(value)) for name, value in cells}


def metrics_value(repo: Path, name: str) -> object:
    file, *keys = name.split(".")
    value = json.loads((repo / f"metrics/{file}.json").read_text())
    for key in keys:
        value = value[key]
    return value


def test_build_report_renders_in_chromium_with_the_metrics_files_figures(
    repo: Path, server: str
) -> None:
    report = repo / "reports/build.html"
    shown = figures(report.read_text())
    headline = {"eval.accuracy", "eval.macro_f1", "compress.size_ratio", "validate.p99_ms"}
    headline |= {"compress.latency_ratio_batch1", "compress.latency_ratio_batch256"}
    headline |= {"profile.drifted_columns.val", "profile.drifted_columns.test"}
    assert headline <= set(shown), sorted(shown)
    for name, value in shown.items():
        assert value == metrics_value(repo, name), name
    # the bento serves the page as packaged: the same figures but the release gate's,
    # which were measured on it afterwards
    bento_tag = json.loads((repo / "dist/bento.json").read_text())["bento_tag"]
    card = requests.get(f"{server}/card", timeout=10)
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/html")
    assert bento_tag in card.text and bento_tag in report.read_text()
    assert figures(card.text) == {k: v for k, v in shown.items() if not k.startswith("validate.")}
    loaded = open_in_chromium(report)
    assert loaded["title"] == "Build report"
    assert loaded["console"] == [] and loaded["failed"] == []
    assert loaded["requests"] == [report.as_uri()]  # self-contained: nothing else loads
    assert loaded["svg"] > 64  # a histogram per digits feature, and the curves
    page = report.read_text()  # the outlying training rows and the shipped detector
    assert "Training rows: " in page and "Shipped detector: <b>" in page and "(chosen)" in page


def open_in_chromium(page: Path) -> dict:
    """Debian's Chromium, headless, through Playwright: what the page logged and fetched."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    seen: dict = {"console": [], "failed": [], "requests": []}
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        tab = browser.new_page()
        tab.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}"))
        tab.on("pageerror", lambda e: seen["console"].append(f"pageerror: {e}"))
        tab.on("requestfailed", lambda r: seen["failed"].append(r.url))
        tab.on("request", lambda r: seen["requests"].append(r.url))
        tab.goto(page.as_uri(), wait_until="load")
        seen["title"] = tab.title()
        seen["svg"] = tab.locator("svg").count()
        browser.close()
    return seen


def test_release_promote_and_fetch_by_version_and_stage(repo: Path, env: dict) -> None:
    """DVC's model registry as a user types it: release the build as 1.0.0, change a serving
    key and release 1.1.0, promote 1.0.0 to prod; a fresh clone gets each bento back from
    the DVC remote by version and by stage (the same bytes).
    Last in this module: it commits to the repo and tags it."""
    import hashlib

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    release = [str(BIN / "python"), "-m", "fullstack_ml.release"]
    bento = repo / "dist/fullstack_ml.bento"
    refused = sh([*release, "register", "1.0.0"], repo, env, check=False)  # exp run's changes
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: the workspace has uncommitted changes (git status); commit them first"
    )
    sh([*git, "add", "-A"], repo, env)
    sh([*git, "commit", "-qm", "build 1"], repo, env)
    assert "released v1.0.0" in sh([*release, "register", "1.0.0"], repo, env).stdout
    first = sha(bento)
    # 1.1.0: a new bento, the sweep's serve.max_batch_size=512 (test_queued_sweep_...),
    # applied from its experiment; run for it where that test did not run
    swept = experiment_where(repo, env, "max_batch_size", 512)
    if swept:
        sh(["dvc", "exp", "apply", swept], repo, env)
    else:
        sh(exp_run([*DISTIL, "serve.max_batch_size=512"]), repo, env)
    second = sha(bento)
    assert second != first
    stale = sh([*release, "register", "1.1.0"], repo, env, check=False)
    assert "uncommitted changes" in stale.stderr
    sh([*git, "add", "-A"], repo, env)
    sh([*git, "commit", "-qm", "build 2"], repo, env)
    sh([*release, "register", "1.1.0"], repo, env)
    sh([*release, "assign", "1.0.0", "--stage", "prod"], repo, env)
    tags = sh(["git", "tag"], repo, env).stdout.split()
    assert {"fullstack-ml@v1.0.0", "fullstack-ml@v1.1.0", "fullstack-ml#prod#1"} <= set(tags)
    # another machine: a clone without the DVC cache (the remote is the repo's default)
    clone = repo.parent / "release-clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    for version, want in (("v1.0.0", first), ("v1.1.0", second)):
        get = ["dvc", "artifacts", "get", ".", "fullstack-ml", "--rev", version]
        sh([*get, "-o", f"{version}.bento"], clone, env)
        assert sha(clone / f"{version}.bento") == want, version
    version, path = sh(
        [*release, "fetch", "--stage", "prod", "-o", "prod"], clone, env
    ).stdout.split()
    assert version == "v1.0.0" and sha(clone / path) == first
    # `make serve STAGE=prod` serves it with FULLSTACK_ML_RELEASE=v1.0.0, which /metadata
    # names (tests/test_service.py's guarded server)


def experiment_where(repo: Path, env: dict, key: str, value: object) -> str | None:
    """The name of an experiment (of any commit) whose `serve.<key>` is `value`."""
    exps = json.loads(sh(["dvc", "exp", "show", "--json", "--all-commits"], repo, env).stdout)
    for commit in exps:
        for exp in commit.get("experiments") or []:
            rev = exp["revs"][0]
            serve = rev["data"]["params"]["params.yaml"]["data"]["serve"]
            if serve[key] == value and rev.get("name"):
                return rev["name"]
    return None
