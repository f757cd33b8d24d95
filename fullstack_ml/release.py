"""Released versions of the build, in DVC's model registry: the artifacts declared in
`dvc.yaml` (`fullstack-ml`, the bento; `fullstack-ml-fp32`, the FP32 model) registered as git
tags in GTO's format, their files pushed to the DVC remote.

    python -m fullstack_ml.release register 1.2.0 [--stage prod]   # `make release VERSION=1.2.0`
    python -m fullstack_ml.release assign 1.1.0 --stage prod       # promote a released version
    python -m fullstack_ml.release fetch --stage prod -o build/release  # prints version, bento

`register` refuses, naming why, unless the workspace is clean (git), the pipeline is up to
date (`dvc status` empty) and the committed release gate (`metrics/validate.json`) passed on
the bento of `dist/`. `dvc artifacts get . fullstack-ml --rev v1.2.0` (or `--stage prod`)
brings a version's bento back on any clone with the remote, as `fetch` does.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fullstack_ml.gates import missed_slos
from fullstack_ml.paths import DIST_DIR, METRICS, PARAMS, VALIDATE_DETAILS
from fullstack_ml.stage import StageError, read_json

BENTO = "fullstack-ml"  # the artifact names of dvc.yaml (GTO: lowercase, digits, dashes)
ARTIFACTS = (BENTO, "fullstack-ml-fp32")
SEMVER = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def sh(cmd: list[str], what: str) -> str:
    """Run `cmd`; its stdout, or a StageError with `what` and the tool's last line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise StageError(f"{what}: {lines[-1]}")
    return proc.stdout


def version_tag(version: str) -> str:
    """`1.2.0` or `v1.2.0` as GTO's `v1.2.0`."""
    if not SEMVER.fullmatch(version or ""):
        raise StageError(f"VERSION: {version!r} is not a version such as 1.2.0")
    return "v" + version.removeprefix("v")


def gate_failures(
    metrics: dict[str, Any], details: dict[str, Any], bento_tag: str, slo: dict[str, Any]
) -> list[str]:
    """Why the release gate's committed figures do not pass for the bento tagged
    `bento_tag` under the SLOs of params.yaml (`serve.slo`); empty when they do."""
    failures = []
    if details.get("bento_tag") != bento_tag:
        failures.append(f"the gate measured {details.get('bento_tag')}, not {bento_tag}")
    if not metrics.get("answers_checked"):
        failures.append("no served answer was checked")
    try:
        failures += missed_slos(details, slo)
    except KeyError as err:  # figures of an older gate, or none
        failures.append(f"the gate's figures lack {err} (run dvc repro)")
    return failures


def check_releasable() -> None:
    """Raise a StageError naming the first reason this checkout cannot be released."""
    if sh(["git", "status", "--porcelain"], "git status").strip():
        raise StageError("the workspace has uncommitted changes (git status); commit them first")
    stale = json.loads(sh(["dvc", "status", "--json"], "dvc status") or "{}")
    if stale:
        raise StageError(
            f"the pipeline is not up to date (dvc status: {', '.join(sorted(stale))}); "
            "run dvc repro and commit"
        )
    slo = yaml.safe_load(PARAMS.read_text())["serve"]["slo"]
    bento_tag = read_json(DIST_DIR / "bento.json")["bento_tag"]
    failures = gate_failures(
        read_json(METRICS["validate"]), read_json(VALIDATE_DETAILS), bento_tag, slo
    )
    if failures:
        raise StageError(f"the release gate did not pass: {'; '.join(failures)}")


def register(version: str, stage: str | None = None) -> str:
    """Push the build's artifacts to the DVC remote, tag HEAD as `version` of each, and
    assign `stage` to it when given; returns the tag (`v1.2.0`)."""
    tag = version_tag(version)
    check_releasable()
    sh(["dvc", "push", "-q", str(DIST_DIR), "models/fp32"], "dvc push (the bento, FP32)")
    for name in ARTIFACTS:
        message = f"{name} {tag}: bento {read_json(DIST_DIR / 'bento.json')['bento_tag']}"
        sh(["gto", "register", name, "--version", tag, "--message", message], f"gto {name}")
    if stage:
        assign(tag, stage)
    return tag


def assign(version: str, stage: str) -> None:
    """Promote a registered `version` of every artifact to `stage` (e.g. prod)."""
    tag = version_tag(version)
    for name in ARTIFACTS:
        sh(["gto", "assign", name, "--version", tag, "--stage", stage], f"gto {name}")


def stage_version(stage: str) -> str:
    """The version of the bento that `stage` is assigned to now."""
    shown = json.loads(sh(["gto", "show", BENTO, "--json"], f"gto show {BENTO}"))
    assigned = [  # the latest assignment wins, as in `gto show` and `dvc artifacts get`
        (s["activated_at"], entry["version"])
        for entry in shown
        for s in entry.get("stages") or []
        if s["stage"] == stage and s["is_active"]
    ]
    if not assigned:
        raise StageError(f"stage {stage!r}: no version of {BENTO} is assigned to it")
    return max(assigned)[1]


def fetch(version: str | None, stage: str | None, out: Path) -> tuple[str, Path]:
    """`dvc artifacts get` of a version's (or a stage's) bento into the folder `out`;
    returns the version and the bento file (`make serve VERSION=` or `STAGE=` serves it)."""
    if (version is None) == (stage is None):
        raise StageError("fetch: give exactly one of a version and a stage")
    tag = version_tag(version) if version else stage_version(stage)
    out.mkdir(parents=True, exist_ok=True)
    which = ["--rev", tag] if version else ["--stage", stage]
    bento = out / "fullstack_ml.bento"
    sh(
        ["dvc", "artifacts", "get", ".", BENTO, *which, "-o", str(bento), "--force"],
        "dvc artifacts",
    )
    return tag, bento


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fullstack_ml.release", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="release HEAD's build as VERSION")
    reg.add_argument("version")
    reg.add_argument("--stage", help="and promote it to this stage")
    promote = sub.add_parser("assign", help="promote a released VERSION to STAGE")
    promote.add_argument("version")
    promote.add_argument("--stage", required=True)
    get = sub.add_parser("fetch", help="bring back a version's or a stage's bento")
    which = get.add_mutually_exclusive_group(required=True)
    which.add_argument("--version")
    which.add_argument("--stage")
    get.add_argument("-o", "--out", type=Path, default=Path("build/release"))
    args = parser.parse_args(argv)
    try:
        if args.command == "register":
            tag = register(args.version, args.stage)
            print(f"released {tag}{f' to {args.stage}' if args.stage else ''}")
        elif args.command == "assign":
            assign(args.version, args.stage)
            print(f"{version_tag(args.version)} -> {args.stage}")
        else:
            print(*fetch(args.version, args.stage, args.out))
    except StageError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
