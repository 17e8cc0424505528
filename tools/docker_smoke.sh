#!/usr/bin/env bash
# Build the CPU image and run, inside it, what a user runs first; one line per check.
#
#   tools/docker_smoke.sh                   # BASE=python:3.11-slim, torch from PyTorch's CPU index
#   tools/docker_smoke.sh --stand-in-base   # no registry: a Debian bookworm base made by debootstrap
#
# Checks: a short training run through the entry point (relora-pretrain); a 2-rank run with
# `deepspeed --num_gpus 2`; the packaging and config tests (`python -m pytest` in the image);
# the documented runs/ mount from a host folder the image's user cannot write (one `error:` line
# naming the fix, exit 2) and the same mount with `--user` (trains).
#
# Builder: docker (with a running daemon), podman or buildah (as root, --isolation chroot), the
# first that works. Environment:
#   BASE             base image (default python:3.11-slim); --stand-in-base builds one instead
#                    (buildah only): Debian bookworm's python 3.11 from Debian's packages
#   TORCH_VERSION    torch in the image where the base has none (default: the Dockerfile's)
#   TORCH_FIND_LINKS a folder holding the CPU torch wheel: torch and its dependencies are served
#                    from 127.0.0.1 as the image's torch index (for machines that reach no
#                    PyTorch index)
#   IMAGE            tag to build (default relora_dist:cpu-smoke)
set -uo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-relora_dist:cpu-smoke}
BASE=${BASE:-python:3.11-slim}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)}
STAND_IN=0
[[ "${1:-}" == "--stand-in-base" ]] && STAND_IN=1
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

if docker info >/dev/null 2>&1; then B=docker
elif command -v podman >/dev/null 2>&1; then B=podman
elif command -v buildah >/dev/null 2>&1; then B=buildah
else echo "skip: no image builder (docker with a daemon, podman or buildah)"; exit 0
fi

if ((STAND_IN)); then
  [[ "$B" == buildah ]] || { echo "error: --stand-in-base needs buildah"; exit 2; }
  command -v debootstrap >/dev/null || { echo "error: --stand-in-base needs debootstrap (apt-get install debootstrap)"; exit 2; }
  BASE=localhost/relora-smoke-base:bookworm
  if ! buildah inspect "$BASE" >/dev/null 2>&1; then
    # python:3.11-slim's shape: python 3.11 as `python` with its headers, pip, no PEP 668 marker.
    debootstrap --variant=minbase --include=python3,python3-dev,python3-pip,python-is-python3,ca-certificates \
      bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 || { tail -5 "$WORK/debootstrap.log"; exit 1; }
    rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    # This machine's CA bundle: a TLS proxy that it trusts must be trusted inside the build too.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    ctr=$(buildah from scratch)
    cp -a "$WORK/rootfs/." "$(buildah mount "$ctr")/"
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd python "$ctr"
    buildah commit -q "$ctr" "$BASE" >/dev/null && buildah rm "$ctr" >/dev/null
  fi
fi

ARGS=(--build-arg "BASE=$BASE" --build-arg "TORCH_VERSION=$TORCH_VERSION")
if [[ -n "${TORCH_FIND_LINKS:-}" ]]; then
  # A PEP 503 index of torch and its dependencies, served on loopback to the build.
  # torch from that folder only (an index would offer the CUDA build), then its dependencies.
  python3 -m pip download -q --no-deps --no-index --find-links "$TORCH_FIND_LINKS" -d "$WORK/wheels" \
    "torch==$TORCH_VERSION" 2>/dev/null || { echo "error: no torch==$TORCH_VERSION wheel in $TORCH_FIND_LINKS"; exit 2; }
  python3 -m pip download -q --only-binary=:all: -d "$WORK/wheels" "$WORK"/wheels/torch-*.whl 2>/dev/null || exit 1
  python3 - "$WORK/wheels" "$WORK/index" <<'EOF'
import pathlib, re, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in src.glob("*.whl"):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    (dst / "simple" / name).mkdir(parents=True, exist_ok=True)
    (dst / "simple" / name / whl.name).symlink_to(whl)
    with open(dst / "simple" / name / "index.html", "a") as f:
        f.write(f'<a href="{whl.name}">{whl.name}</a>\n')
EOF
  PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/index" >/dev/null 2>&1 &
  SERVER_PID=$!
  ARGS+=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$PORT/simple")
fi

t0=$SECONDS
case $B in
  buildah) buildah bud --layers --isolation chroot --network host -q -t "$IMAGE" "${ARGS[@]}" . >"$WORK/build.log" 2>&1 ;;
  *) $B build --network host -q -t "$IMAGE" "${ARGS[@]}" . >"$WORK/build.log" 2>&1 ;;
esac || { tail -20 "$WORK/build.log"; echo "FAIL build: $B, BASE=$BASE"; exit 1; }
echo "ok   build: $B, BASE=$BASE, torch $TORCH_VERSION, $((SECONDS - t0)) s"

# in_image [--user U] [--mount HOST] -- CMD...: run CMD in a fresh container of the image
in_image() {
  local opts=() user="" mount=""
  while [[ "$1" != "--" ]]; do
    case $1 in --user) user=$2; shift 2 ;; --mount) mount=$2; shift 2 ;; esac
  done
  shift
  [[ -n "$mount" ]] && opts+=(-v "$mount:/opt/relora_dist/runs")
  [[ -n "$user" ]] && opts+=(--user "$user")
  if [[ $B == buildah ]]; then
    local ctr rc
    ctr=$(buildah from -q "$IMAGE")
    buildah run --isolation chroot --network host "${opts[@]}" "$ctr" -- "$@"
    rc=$?
    buildah rm "$ctr" >/dev/null
    return $rc
  fi
  $B run --rm --network host "${opts[@]}" --entrypoint "$1" "$IMAGE" "${@:2}"
}

TINY=(--model.hidden_size=64 --model.intermediate_size=172 --model.num_layers=2 --model.num_heads=4
      --data.seq_len=32 --train.global_batch_size=8 --train.micro_batch_size=4 --train.max_steps=12
      --train.eval_every=0 --train.eval_tokens=512 --relora.warm_start_steps=4 --relora.cycle_length=4
      --relora.first_warmup=1 --relora.restart_warmup=1 --relora.r=8 --logging.progress_bar=false)
FAILED=0
check() {  # check NAME EXPECTED_RC GREP [--mount HOST] [--user U] -- CMD...
  local name=$1 want=$2 pattern=$3 out rc
  shift 3
  out=$(in_image "$@" 2>&1)
  rc=$?
  if [[ $rc == "$want" ]] && grep -q -- "$pattern" <<<"$out" && ! grep -q Traceback <<<"$out"; then
    echo "ok   $name: exit $rc, $(grep -m1 -- "$pattern" <<<"$out" | cut -c1-150)"
  else
    echo "FAIL $name: exit $rc (want $want, a line matching '$pattern'); last lines:"
    tail -8 <<<"$out" | sed 's/^/     /'
    FAILED=1
  fi
}

export DS_ACCELERATOR=cpu
check "train (entry point relora-pretrain)" 0 "^done |" -- \
  env OMP_NUM_THREADS=1 relora-pretrain "${TINY[@]}" --run.output_dir=/tmp/smoke
check "deepspeed --num_gpus 2" 0 "^done |" -- \
  env OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launchers/pretrain.py "${TINY[@]}" --run.output_dir=/tmp/smoke2
check "tests in the image" 0 " passed" -- \
  env OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider tests/test_packaging.py tests/test_config.py
mkdir -p "$WORK/runs" && chmod 755 "$WORK/runs"  # owned by this user (root), not the image's
check "runs/ mounted from a folder the image's user can't write" 2 "^error: .*--user" \
  --mount "$WORK/runs" -- relora-pretrain "${TINY[@]}"
check "the same mount with --user $(id -u):$(id -g)" 0 "^done |" \
  --mount "$WORK/runs" --user "$(id -u):$(id -g)" -- relora-pretrain "${TINY[@]}"
exit $FAILED
