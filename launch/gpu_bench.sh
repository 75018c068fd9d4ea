#!/usr/bin/env bash
# Benchmark of the MST-KD steps on one GPU box that has JAX and PyTorch but no TensorFlow:
# IResNet-34, 112x112, global batch 128; bfloat16 (every step) and float32 (the plain
# step), each beside the PyTorch reference step. Prints the tables and the JSON reports.
#
#   launch/gpu_bench.sh fetch   # where pip reaches PyPI: the wheels the GPU box lacks -> .whl/
#   launch/gpu_bench.sh run     # on the GPU box: installs .whl/*.whl if needed, benchmarks
#
# With this workplace's device tool, from the repo root:
#   launch/gpu_bench.sh fetch, then run(command="bash launch/gpu_bench.sh run",
#   carry=[".whl"], timeout_s=560); the JSON files come back from $OUT.
# Environment: PYTHON (default python3), STEPS (timed steps per round, default 20),
# OUT (where the JSON and logs go; default /tmp/mstkd_bench), BENCH_ARGS (more bench
# flags for both runs; later flags win, e.g. "--stage_depths=1,1,1,1 --batch=8" for a try).
set -euo pipefail

SCRIPT_DIR=.; [[ ${BASH_SOURCE[0]} == */* ]] && SCRIPT_DIR=${BASH_SOURCE[0]%/*}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"  # PROG, REPO and the helpers shared by the launch scripts
PY=${PYTHON:-python3}
WHEELS=$REPO/.whl
SITE=/tmp/mstkd_bench_site
# Pure-Python wheels the GPU box may lack (absl-py and PyYAML are usually there).
NEEDED=(ml-collections==1.1.0)

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}


do_fetch() {
  mkdir -p "$WHEELS"
  if [[ -d $REPO/.git ]] && ! grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null; then
    mkdir -p "$REPO/.git/info"
    echo '/.whl/' >>"$REPO/.git/info/exclude"
  fi
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$WHEELS" "${NEEDED[@]}"
  ls -l "$WHEELS"
}

do_run() {
  cd "$REPO"
  if ! "$PY" -c 'import ml_collections, absl' 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null ||
      die "ml_collections or absl is missing and $WHEELS has no wheels: run '$PROG fetch' where pip reaches PyPI and bring .whl along"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  local out=${OUT:-/tmp/mstkd_bench}
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
  nvidia-smi -L 2>/dev/null || true
  "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
  local common=(--config=configs/distill.py:bupt_iresnet34 --batch=128 --image_size=112
                --steps="${STEPS:-20}" --warmup=3 --rounds=3 --torch)
  # shellcheck disable=SC2206  # BENCH_ARGS is split into words on purpose
  common+=(${BENCH_ARGS:-})
  local status=0
  # bfloat16: every step (the KD ratios, extraction, adaptor, MFU, PyTorch side by side).
  "$PY" -m mstkd_jax.bench "${common[@]}" --config.student.model.dtype=bfloat16 \
    --out="$out/bench_bf16.json" 2>&1 | tee "$out/bench_bf16.log" || status=1
  # float32: the plain step and PyTorch's, for MFU and the ratio at full precision.
  "$PY" -m mstkd_jax.bench "${common[@]}" --config.student.model.dtype=float32 --only=plain \
    --out="$out/bench_fp32.json" 2>&1 | tee "$out/bench_fp32.log" || status=1
  for f in "$out"/bench_bf16.json "$out"/bench_fp32.json; do
    [[ -f $f ]] && { echo "== $f"; cat "$f"; echo; }
  done
  return "$status"
}

case ${1:-run} in
  -h | --help) usage ;;
  fetch) do_fetch ;;
  run) do_run ;;
  *) usage >&2; die "unknown command: $1 (expected fetch or run)" ;;
esac
