#!/usr/bin/env bash
# Single multi-GPU host launcher for mstkd_jax: set up a venv with JAX for CUDA 12,
# then run training as one process that sees all (visible) GPUs.
# Run with --help for usage.
set -euo pipefail

SCRIPT_DIR=.; [[ ${BASH_SOURCE[0]} == */* ]] && SCRIPT_DIR=${BASH_SOURCE[0]%/*}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"  # PROG, REPO and the helpers shared by the launch scripts

usage() {
  cat <<EOF
Usage: launch/$PROG COMMAND [options] [-- ARGS...]

Run mstkd_jax on one host with one or more NVIDIA GPUs.

Commands:
  setup    make the venv (default: <repo>/.venv) and install requirements.txt (the
           lock) and then "jax[$CUDA_JAX_EXTRA]" of the JAX version it locked into it
           (needs Python >= 3.11)
  run      run "python -m mstkd_jax.main --multihost=false" from the repo root, as
           one process that uses every GPU it can see. CUDA_VISIBLE_DEVICES from the
           environment is respected (--gpus sets it).

Options:
  --venv=DIR               venv to make / use (default: <repo>/.venv, or MSTKD_VENV)
  --python=PYTHON          setup: interpreter for the venv (default: python3)
  --config=FILE[:PRESET]   run: the config (default: configs/distill.py)
  --config.KEY=VALUE       run: config override, passed through to mstkd_jax.main
  --run-name=NAME          run: names the default workdir
                           (default: mstkd-YYYYmmdd-HHMMSS; letters, digits, . _ -)
  --workdir=DIR            run: default <repo>/workdir/RUN_NAME
  --tfds-data-dir=DIR      run: sets TFDS_DATA_DIR (default: the TFDS_DATA_DIR
                           environment variable if set, else TFDS's own default)
  --gpus=LIST              run: the GPUs to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)
  --dry-run                print the commands (one per line, prefixed "+ ",
                           shell-quoted) instead of running them
  -h, --help               show this help
  -- ARGS...               run: further arguments for mstkd_jax.main

Options take "--opt=value" or "--opt value".

Examples:
  launch/$PROG setup
  launch/$PROG run --run-name=distill1 --config=configs/distill.py
  TFDS_DATA_DIR=/data/tfds CUDA_VISIBLE_DEVICES=0,1 launch/$PROG run --config=configs/distill.py:PRESET
  launch/$PROG run --gpus=2,3 --config.KEY=VALUE -- --multihost=false
  launch/$PROG run --dry-run
EOF
}


# ---------------------------------------------------------------- arguments
cmd=''
dry_run=0
venv=${MSTKD_VENV:-$REPO/.venv}
python=python3
config=configs/distill.py
run_name=''
workdir=''
tfds_dir=${TFDS_DATA_DIR:-}
gpus=${CUDA_VISIBLE_DEVICES-}
gpus_set=${CUDA_VISIBLE_DEVICES+1}
extra=()
scoped=()
main_cmd=run

while (($#)); do
  case $1 in
    --gpus | --gpus=*) optval "$@"; gpus=$OPTVAL; gpus_set=1; scoped+=("--gpus|run"); shift "$OPTSHIFT" ;;
    *) gpu_option "$@"; shift "$OPTSHIFT" ;;
  esac
done

case $cmd in
  setup | run) ;;
  '') usage >&2; die "no command given (setup or run)" ;;
  *) die "unknown command: $cmd (expected setup or run)" ;;
esac

check_gpu_options

# ---------------------------------------------------------------- commands
do_setup() {
  make_cuda_venv ''
  if ((!dry_run)); then
    "$venv/bin/python" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())' ||
      note "warning: JAX did not start; check the NVIDIA driver (nvidia-smi)"
  fi
  note "next: launch/$PROG run --config=configs/distill.py"
}

do_run() {
  gpu_run_paths
  if ((!dry_run)) && [[ ! -x $venv/bin/python ]]; then
    die "no venv at $venv; run 'launch/$PROG setup' first (or pass --venv=DIR)"
  fi

  local envs=()
  if [[ -n $gpus_set ]]; then
    envs+=(CUDA_VISIBLE_DEVICES="$gpus")
    note "GPUs: CUDA_VISIBLE_DEVICES=$gpus"
  else
    note "GPUs: all (CUDA_VISIBLE_DEVICES is not set)"
  fi
  if [[ -n $tfds_dir ]]; then
    envs+=(TFDS_DATA_DIR="$tfds_dir")
  else
    note "TFDS_DATA_DIR is not set; TFDS uses its default (~/tensorflow_datasets)"
  fi
  note "workdir: $workdir"

  run_cmd cd "$REPO"
  # --multihost=false: one process on one host; words after it can override it.
  run_cmd env ${envs[@]+"${envs[@]}"} "$venv/bin/python" -m mstkd_jax.main \
    --config="$config" --workdir="$workdir" --multihost=false ${extra[@]+"${extra[@]}"}
}

"do_$cmd"
