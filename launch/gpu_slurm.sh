#!/usr/bin/env bash
# SLURM launcher for mstkd_jax on GPU clusters: writes a batch script that starts
# one process per GPU (srun, --multihost=true; JAX finds the cluster through
# SLURM's environment) and submits it with sbatch. Run with --help for usage.
set -euo pipefail

SCRIPT_DIR=.; [[ ${BASH_SOURCE[0]} == */* ]] && SCRIPT_DIR=${BASH_SOURCE[0]%/*}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"  # PROG, REPO and the helpers shared by the launch scripts

usage() {
  cat <<EOF
Usage: launch/$PROG [submit] [options] [-- ARGS...]
       launch/$PROG setup [--venv=DIR] [--python=PYTHON] [--dry-run]

Train mstkd_jax on a SLURM GPU cluster. The checkout and the venv must be on a
file system that every node sees.

Commands:
  submit   (default) write a batch script and submit it with sbatch. It asks for
           --nodes nodes with --gpus-per-node GPUs each and starts one task per GPU
           (ntasks-per-node = gpus-per-node) with
             srun python -m mstkd_jax.main --multihost=true ...
           Every task sees all GPUs of its node and JAX gives it the one with
           index SLURM_LOCALID, so do not add per-task GPU binding (--gpus-per-task).
  setup    make the venv (default: <repo>/.venv) and install requirements.txt (the
           lock) and then "jax[$CUDA_JAX_EXTRA]" of the JAX version it locked into it;
           run it once, on a login node (Python >= 3.11)

Options for submit:
  --nodes=N                nodes (default: 1)
  --gpus-per-node=G        GPUs per node = tasks per node (default: 8)
  --gpu-type=TYPE          ask for GPUs of this type (--gpus-per-node=TYPE:G)
  --cpus-per-task=C        CPUs per task (recommended: the input pipeline needs some)
  --mem=MEM                memory per node, e.g. 200G
  --time=TIME              time limit, e.g. 2-00:00:00
  --partition=P, --account=A, --qos=Q
                           the usual sbatch settings (sbatch also reads
                           SBATCH_PARTITION, SBATCH_ACCOUNT, ... from the environment)
  --job-name=NAME          default: mstkd
  --sbatch-arg=ARG         extra "#SBATCH ARG" line, e.g. --sbatch-arg=--exclusive
                           (repeatable; use it for --gres=gpu:G on old clusters)
  --prolog=COMMAND         shell line run in the batch script before srun, e.g.
                           --prolog='module load cuda' (repeatable; not quoted)
  --config=FILE[:PRESET]   the config (default: configs/distill.py)
  --config.KEY=VALUE       config override, passed through to mstkd_jax.main
  --run-name=NAME          names the default workdir, the logs and the batch script
                           (default: mstkd-YYYYmmdd-HHMMSS; letters, digits, . _ -)
  --workdir=DIR            default: <repo>/workdir/RUN_NAME
  --tfds-data-dir=DIR      sets TFDS_DATA_DIR in the job (default: the TFDS_DATA_DIR
                           environment variable if set)
  --log-dir=DIR            batch script and logs (default: <repo>/workdir/slurm_logs);
                           RUN_NAME-JOBID.out and RUN_NAME-JOBID.task<N>.log per task
  --venv=DIR               the venv (default: <repo>/.venv, or MSTKD_VENV)
Options for setup:
  --venv=DIR, --python=PYTHON (default: python3)
Common:
  --dry-run                print the batch script and the commands (prefixed "+ ")
                           instead of writing and submitting
  -h, --help               show this help
  -- ARGS...               further arguments for mstkd_jax.main

Options take "--opt=value" or "--opt value".

Examples:
  launch/$PROG setup
  launch/$PROG --nodes=2 --gpus-per-node=8 --cpus-per-task=12 --partition=gpu \\
      --time=1-00:00:00 --run-name=distill1 --config=configs/distill.py
  launch/$PROG --nodes=4 --gpus-per-node=4 --tfds-data-dir=/shared/tfds \\
      --config=configs/distill.py:PRESET --config.KEY=VALUE --dry-run
EOF
}


# ---------------------------------------------------------------- arguments
cmd=''
dry_run=0
venv=${MSTKD_VENV:-$REPO/.venv}
python=python3
nodes=1
gpus=8
gpu_type=''
cpus=''
mem=''
time_limit=''
partition=''
account=''
qos=''
job_name=mstkd
sbatch_args=()
prologs=()
config=configs/distill.py
run_name=''
workdir=''
tfds_dir=${TFDS_DATA_DIR:-}
log_dir=''
extra=()
scoped=()
main_cmd=submit

while (($#)); do
  case $1 in
    --nodes | --nodes=*) optval "$@"; nodes=$OPTVAL; scoped+=("--nodes|submit"); shift "$OPTSHIFT" ;;
    --gpus-per-node | --gpus-per-node=*) optval "$@"; gpus=$OPTVAL; scoped+=("--gpus-per-node|submit"); shift "$OPTSHIFT" ;;
    --gpu-type | --gpu-type=*) optval "$@"; gpu_type=$OPTVAL; scoped+=("--gpu-type|submit"); shift "$OPTSHIFT" ;;
    --cpus-per-task | --cpus-per-task=*) optval "$@"; cpus=$OPTVAL; scoped+=("--cpus-per-task|submit"); shift "$OPTSHIFT" ;;
    --mem | --mem=*) optval "$@"; mem=$OPTVAL; scoped+=("--mem|submit"); shift "$OPTSHIFT" ;;
    --time | --time=*) optval "$@"; time_limit=$OPTVAL; scoped+=("--time|submit"); shift "$OPTSHIFT" ;;
    --partition | --partition=*) optval "$@"; partition=$OPTVAL; scoped+=("--partition|submit"); shift "$OPTSHIFT" ;;
    --account | --account=*) optval "$@"; account=$OPTVAL; scoped+=("--account|submit"); shift "$OPTSHIFT" ;;
    --qos | --qos=*) optval "$@"; qos=$OPTVAL; scoped+=("--qos|submit"); shift "$OPTSHIFT" ;;
    --job-name | --job-name=*) optval "$@"; job_name=$OPTVAL; scoped+=("--job-name|submit"); shift "$OPTSHIFT" ;;
    --sbatch-arg=*) sbatch_args+=("${1#*=}"); scoped+=("--sbatch-arg|submit"); shift ;;
    --sbatch-arg) die "write --sbatch-arg=ARG (with '=')" ;;
    --prolog | --prolog=*) optval "$@"; prologs+=("$OPTVAL"); scoped+=("--prolog|submit"); shift "$OPTSHIFT" ;;
    --log-dir | --log-dir=*) optval "$@"; log_dir=$OPTVAL; scoped+=("--log-dir|submit"); shift "$OPTSHIFT" ;;
    *) gpu_option "$@"; shift "$OPTSHIFT" ;;
  esac
done

cmd=${cmd:-submit}
case $cmd in
  submit | setup) ;;
  *) die "unknown command: $cmd (expected submit or setup)" ;;
esac

check_gpu_options

# ---------------------------------------------------------------- commands
do_setup() {
  make_cuda_venv ' (or load its module)'
  note "next: launch/$PROG --nodes=N --gpus-per-node=G --config=configs/distill.py"
}

# Prints the batch script.
batch_script() {
  local gpu_req=$gpus
  if [[ -n $gpu_type ]]; then
    gpu_req=$gpu_type:$gpus
  fi
  echo '#!/bin/bash'
  echo "# mstkd_jax run '$run_name', written by launch/$PROG: $nodes node(s) x $gpus GPU(s), one task per GPU."
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$gpus"
  echo "#SBATCH --gpus-per-node=$gpu_req"
  if [[ -n $cpus ]]; then echo "#SBATCH --cpus-per-task=$cpus"; fi
  if [[ -n $mem ]]; then echo "#SBATCH --mem=$mem"; fi
  if [[ -n $time_limit ]]; then echo "#SBATCH --time=$time_limit"; fi
  if [[ -n $partition ]]; then echo "#SBATCH --partition=$partition"; fi
  if [[ -n $account ]]; then echo "#SBATCH --account=$account"; fi
  if [[ -n $qos ]]; then echo "#SBATCH --qos=$qos"; fi
  # sbatch does not expand variables here; %j is the job id.
  echo "#SBATCH --output=$log_dir/$run_name-%j.out"
  local a
  for a in ${sbatch_args[@]+"${sbatch_args[@]}"}; do
    echo "#SBATCH $a"
  done
  echo
  echo 'set -euo pipefail'
  echo "cd $(q "$REPO")"
  if [[ -n $tfds_dir ]]; then
    echo "export TFDS_DATA_DIR=$(q "$tfds_dir")"
  fi
  echo 'export PYTHONUNBUFFERED=1'
  if ((${#prologs[@]})); then
    # Module systems often trip over "set -u".
    echo 'set +u'
    for a in "${prologs[@]}"; do
      echo "$a"
    done
    echo 'set -u'
  fi
  echo "echo \"job \$SLURM_JOB_ID: \$SLURM_JOB_NUM_NODES node(s) [\$SLURM_JOB_NODELIST], $gpus task(s) per node; logs: $log_dir/$run_name-\$SLURM_JOB_ID.task<N>.log\""
  # One task per GPU. Every task sees all of its node's GPUs; JAX's SLURM
  # detection (jax.distributed.initialize, called by main for --multihost=true)
  # takes the coordinator from SLURM_STEP_NODELIST, the process count and id
  # from SLURM_NTASKS/SLURM_PROCID and the GPU from SLURM_LOCALID.
  local srun=(srun --nodes="$nodes" --ntasks-per-node="$gpus")
  if [[ -n $cpus ]]; then
    # Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch.
    srun+=(--cpus-per-task="$cpus")
  fi
  srun+=(--kill-on-bad-exit=1 --output="$log_dir/$run_name-%j.task%t.log")
  srun+=("$venv/bin/python" -m mstkd_jax.main --config="$config" --workdir="$workdir" --multihost=true)
  fmt_cmd "${srun[@]}" ${extra[@]+"${extra[@]}"}
  echo
}

do_submit() {
  local n
  for n in "nodes:$nodes" "gpus-per-node:$gpus"; do
    if ! [[ ${n#*:} =~ ^[1-9][0-9]*$ ]]; then
      die "--${n%%:*} must be a positive integer (got: ${n#*:})"
    fi
  done
  if [[ -n $cpus ]] && ! [[ $cpus =~ ^[1-9][0-9]*$ ]]; then
    die "--cpus-per-task must be a positive integer (got: $cpus)"
  fi
  gpu_run_paths
  log_dir=$(abspath "${log_dir:-$REPO/workdir/slurm_logs}")
  # #SBATCH lines are not parsed by a shell: their values cannot be quoted.
  local v
  for v in "job-name:$job_name" "log-dir:$log_dir" "mem:$mem" "time:$time_limit" \
    "partition:$partition" "account:$account" "qos:$qos" "gpu-type:$gpu_type"; do
    if [[ ${v#*:} == *[[:space:]]* ]]; then
      die "--${v%%:*} may not contain whitespace (it goes into an #SBATCH line; got: ${v#*:})"
    fi
  done
  if [[ -z $tfds_dir ]]; then
    note "TFDS_DATA_DIR is not set (--tfds-data-dir); TFDS uses its default (~/tensorflow_datasets) on every node"
  fi

  local script=$log_dir/$run_name.sbatch
  if ((dry_run)); then
    printf '# ---- batch script (%s) ----\n' "$script"
    batch_script
    printf '# ---- end of batch script ----\n'
    run_cmd sbatch "$script"
    return 0
  fi

  if ! command -v sbatch >/dev/null 2>&1; then
    die "'sbatch' was not found on PATH. Run this on a SLURM login node (install or load the" \
      "SLURM client tools, e.g. 'module load slurm'), or use --dry-run to only print the batch script."
  fi
  if [[ ! -x $venv/bin/python ]]; then
    die "no venv at $venv; run 'launch/$PROG setup' first (or pass --venv=DIR)"
  fi
  mkdir -p -- "$log_dir"
  batch_script >"$script"
  note "wrote $script"
  run_cmd sbatch "$script"
  note "workdir: $workdir"
  note "logs: $log_dir/$run_name-<jobid>.out and $log_dir/$run_name-<jobid>.task<N>.log (one per process)"
}

"do_$cmd"
