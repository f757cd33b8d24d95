#!/usr/bin/env bash
# Build an OCI image of a bento with podman, without an image registry:
#   1. a Debian bookworm base image (debootstrap, Python 3.11, uv), made once;
#   2. a wheelhouse of the bento's own requirements.txt, resolved on this host (CPU torch
#      from pip's find-links; versions pinned to .venv's, so the image runs what tests ran);
#   3. `bentoml containerize --backend podman`, its FROM swapped for the base (podman build
#      --from) and the wheelhouse mounted where the base's uv.toml points uv (no index).
# Usage: deploy/container.sh [IMAGE] [BENTO_FILE]
#   IMAGE defaults to fullstack-ml:latest, BENTO_FILE to the one dist/bento.json names.
#        deploy/container.sh --base    # step 1 alone (the test suite starts it early)
# Exit status 3: this machine cannot build or run containers (a tool missing, podman broken).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${1:-fullstack-ml:latest}
BENTO=${2:-}
UV_VERSION=0.13.4 # bentoml's Dockerfile installs this uv unless the base image has it
BASE=localhost/fullstack-ml-base:bookworm-build-uv$UV_VERSION
PY=$ROOT/.venv/bin/python
WORK=$ROOT/build/container
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/containers.conf}
export BENTOML_HOME=$WORK/bentoml BENTOML_DO_NOT_TRACK=true

die() { echo "error: $1" >&2; exit "${2:-1}"; }
unusable() { die "$1" 3; }
for tool in podman runc; do
  command -v $tool >/dev/null || unusable "$tool not found (apt-get install podman runc)"
done
mkdir -p "$WORK"
exec 9>"$WORK/lock" && flock 9 # one build at a time: they share build/container
podman info >/dev/null 2>"$WORK/info.err" ||
  unusable "podman info failed: $(tail -1 "$WORK/info.err")"

if ! podman image exists "$BASE"; then
  command -v debootstrap >/dev/null || unusable "debootstrap not found (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || unusable "debootstrap needs root to make the base image $BASE"
  rootfs=$WORK/rootfs
  rm -rf "$rootfs" "$WORK/uv"
  echo "== base image $BASE: debootstrap bookworm"
  # + what the bento's Dockerfile apt-installs (BentoML's default install command), so that
  # its step finds them installed (13 s of every image build here) rather than fetching them
  debootstrap --variant=minbase --include=python3,ca-certificates,gnupg2,build-essential,git \
    bookworm "$rootfs" \
    >"$WORK/debootstrap.log" || die "debootstrap failed; see $WORK/debootstrap.log"
  "$PY" -m pip install -q --no-deps --target "$WORK/uv" "uv==$UV_VERSION" 2>/dev/null
  install -m 755 "$WORK/uv/bin/uv" "$rootfs/usr/local/bin/uv"
  # uv installs only from /wheelhouse, a volume mounted at build time: never from an index.
  mkdir -p "$rootfs/etc/uv"
  printf '%s\n' 'no-index = true' 'find-links = ["/wheelhouse"]' 'no-cache = true' \
    'python-downloads = "never"' >"$rootfs/etc/uv/uv.toml"
  # apt and dpkg keep no package files, lists, caches or docs (the bento's Dockerfile runs
  # apt-get install, and whatever it leaves stays in a layer).
  printf '%s\n' 'APT::Keep-Downloaded-Packages "false";' 'Acquire::Languages "none";' \
    'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' \
    'DPkg::Post-Invoke { "rm -rf /var/cache/apt/archives/*.deb /var/lib/apt/lists/*"; };' \
    >"$rootfs/etc/apt/apt.conf.d/90slim"
  printf 'path-exclude=/usr/share/%s/*\n' doc man info locale lintian \
    >"$rootfs/etc/dpkg/dpkg.cfg.d/90slim"
  rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/{doc,man,info,locale,lintian}/*
  tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs" "$WORK/uv"
fi
podman run --rm --network none "$BASE" true 2>"$WORK/run.err" ||
  unusable "podman run $BASE failed: $(grep -m1 -i error "$WORK/run.err" || tail -1 "$WORK/run.err")"
[ "$IMAGE" != --base ] || exit 0
if [ -z "$BENTO" ]; then
  [ -f dist/bento.json ] || die "no dist/bento.json; run make repro first"
  BENTO=$ROOT/dist/$("$PY" -c 'import json; print(json.load(open("dist/bento.json"))["file"])')
fi
BENTO=$(realpath "$BENTO")

# A model store of this bento alone; containerize copies its models into the image.
rm -rf "$BENTOML_HOME"
tag=$("$ROOT/.venv/bin/bentoml" import "$BENTO" | sed -n 's/.*tag="\([^"]*\)".*/\1/p')
[ -n "$tag" ] || die "bentoml import $BENTO printed no tag"
echo "== wheelhouse for $tag"
rm -rf "$WORK/wheelhouse"
"$PY" -m pip freeze --exclude-editable | grep -v ' @ ' >"$WORK/constraints.txt"
"$PY" -m pip wheel -q -w "$WORK/wheelhouse" -c "$WORK/constraints.txt" \
  -r "$BENTOML_HOME/bentos/${tag%%:*}/${tag#*:}/env/python/requirements.txt" \
  2> >(grep -v '^WARNING: Location' >&2)

echo "== podman build $IMAGE"
PYTHONWARNINGS=ignore::UserWarning "$ROOT/.venv/bin/bentoml" containerize --backend podman \
  "$tag" --image-tag "$IMAGE" --opt from="$BASE" --opt volume="$WORK/wheelhouse:/wheelhouse:ro"
podman image inspect "$IMAGE" --format "$IMAGE: user {{.Config.User}}, {{.Size}} bytes"
