#!/usr/bin/env bash
# Build an OCI image of a bento with podman, without an image registry:
#   1. a Debian bookworm base image (debootstrap, Python 3.11, uv), made once: `slim` (Python
#      alone) for a bento off torch (service.py gives it an image without BentoML's apt-get
#      of build-essential and git), `build` (+ build-essential, which Inductor compiles with
#      at run time) for a bento on inductor;
#   2. a wheelhouse of the bento's own requirements.txt, resolved on this host (CPU torch
#      from pip's find-links; versions pinned to .venv's, so the image runs what tests ran);
#   3. `bentoml containerize --backend podman`, its FROM swapped for the base (podman build
#      --from) and the wheelhouse mounted where the base's uv.toml points uv (no index).
# Usage: deploy/container.sh [IMAGE] [BENTO_FILE]
#   IMAGE defaults to fullstack-ml:latest, BENTO_FILE to the one dist/bento.json names.
#        deploy/container.sh --base [slim|build]   # step 1 alone (the test suite starts it early)
# Exit status 3: this machine cannot build or run containers (a tool missing, podman broken).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${1:-fullstack-ml:latest}
BENTO=${2:-}
UV_VERSION=0.13.4 # bentoml's Dockerfile installs this uv unless the base image has it
BASE_NAME=localhost/fullstack-ml-base:bookworm
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

make_base() { # $1: slim | build
  local BASE=$BASE_NAME-$1-uv$UV_VERSION extra=""
  [ "$1" = slim ] || extra=,gnupg2,build-essential,git
  podman image exists "$BASE" && return 0
  command -v debootstrap >/dev/null || unusable "debootstrap not found (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || unusable "debootstrap needs root to make the base image $BASE"
  rootfs=$WORK/rootfs
  rm -rf "$rootfs" "$WORK/uv"
  echo "== base image $BASE: debootstrap bookworm"
  # build: + what the bento's Dockerfile apt-installs (BentoML's Debian template), so that
  # its step finds them installed (13 s of every image build here) rather than fetching them
  debootstrap --variant=minbase --include=python3,ca-certificates$extra \
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
}
check_base() { # $1: slim | build
  local BASE=$BASE_NAME-$1-uv$UV_VERSION
  make_base "$1"
  podman run --rm --network none "$BASE" true 2>"$WORK/run.err" ||
    unusable "podman run $BASE failed: $(grep -m1 -i error "$WORK/run.err" || tail -1 "$WORK/run.err")"
}
if [ "$IMAGE" = --base ]; then
  check_base "${BENTO:-slim}"
  exit 0
fi
if [ -z "$BENTO" ]; then
  [ -f dist/bento.json ] || die "no dist/bento.json; run make repro first"
  BENTO=$ROOT/dist/$("$PY" -c 'import json; print(json.load(open("dist/bento.json"))["file"])')
fi
BENTO=$(realpath "$BENTO")

# A model store of this bento alone; containerize copies its models into the image.
rm -rf "$BENTOML_HOME"
tag=$("$ROOT/.venv/bin/bentoml" import "$BENTO" | sed -n 's/.*tag="\([^"]*\)".*/\1/p')
[ -n "$tag" ] || die "bentoml import $BENTO printed no tag"
# a bento whose Dockerfile installs no build tools (off torch: service.py) gets the slim base
bento_dir=$BENTOML_HOME/bentos/${tag%%:*}/${tag#*:}
flavor=slim
grep -q build-essential "$bento_dir/env/docker/Dockerfile" && flavor=build
BASE=$BASE_NAME-$flavor-uv$UV_VERSION
check_base $flavor
echo "== wheelhouse for $tag"
rm -rf "$WORK/wheelhouse"
"$PY" -m pip freeze --exclude-editable | grep -v ' @ ' >"$WORK/constraints.txt"
"$PY" -m pip wheel -q -w "$WORK/wheelhouse" -c "$WORK/constraints.txt" \
  -r "$bento_dir/env/python/requirements.txt" \
  2> >(grep -v '^WARNING: Location' >&2)

echo "== podman build $IMAGE"
PYTHONWARNINGS=ignore::UserWarning "$ROOT/.venv/bin/bentoml" containerize --backend podman \
  "$tag" --image-tag "$IMAGE-layers" --opt from="$BASE" \
  --opt volume="$WORK/wheelhouse:/wheelhouse:ro"
# One layer, without what serving never loads: the packages' own test suites (92 MB:
# pandas, scipy, numpy), onnxruntime's model-conversion tools and its C API library (35 MB;
# its Python binding links its own copy), uv (the install's); files deleted in a later
# layer would still be in the image, so the layers are squashed into one.
site=/app/.venv/lib/python3.11/site-packages
podman build -q --squash-all --network none -t "$IMAGE" -f - . >/dev/null <<EOF
FROM $IMAGE-layers
USER root
RUN find $site -depth -type d -name tests -exec rm -rf {} + && \
    rm -rf $site/onnxruntime/transformers $site/onnxruntime/quantization \
      $site/onnxruntime/tools $site/onnxruntime/datasets $site/onnxruntime/capi/libonnxruntime.so.* \
      /usr/local/bin/uv
USER bentoml
EOF
podman rmi -i "$IMAGE-layers" >/dev/null
podman image inspect "$IMAGE" --format "$IMAGE: user {{.Config.User}}, {{.Size}} bytes"
