#!/usr/bin/env bash
# Cloud TPU VM launcher for mstkd_jax: create a TPU VM (one host or a multi-host
# pod slice), install the code on every worker, run training on every worker,
# open a shell, delete it. Run with --help for usage.
set -euo pipefail

SCRIPT_DIR=.; [[ ${BASH_SOURCE[0]} == */* ]] && SCRIPT_DIR=${BASH_SOURCE[0]%/*}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"  # PROG, REPO and the helpers shared by the launch scripts

# Where things live on every worker. The ~ is meant literally: it is expanded
# by the worker's shell, not here.
# shellcheck disable=SC2088
REMOTE_CODE='~/mstkd_jax' REMOTE_VENV='~/mstkd_venv' REMOTE_LOGS='~/mstkd_logs'
REMOTE_TARBALL='mstkd_jax_src.tar.gz'
# run gives mstkd_jax the workdir as a gs:// URL and mounts gs://BUCKET here on every
# worker (gcsfuse) for the TFDS data: array_record, its file format, reads local files only.
REMOTE_MOUNTS='/mnt/gcs'
# pip's jax[tpu] (libtpu) of the JAX version requirements.txt locked, after the lock.
JAX_EXTRA='tpu'

usage() {
  cat <<EOF
Usage: launch/$PROG COMMAND [options] [-- ARGS...]

Manage a Cloud TPU VM (a single host or a multi-host pod slice) for mstkd_jax.

Commands:
  create   create the TPU VM
  setup    copy this checkout (a tarball of the tracked and untracked, not ignored
           files; no .git/, no workdirs) to every worker, unpack it into
           $REMOTE_CODE, make the venv $REMOTE_VENV (Python >= 3.11; installed with
           apt when the image lacks it), install requirements.txt (the lock)
           and "jax[$JAX_EXTRA]" of the JAX version it locked there, and gcsfuse (Google's apt repository) when
           missing. Run it again after changing the code.
  run      run "python -m mstkd_jax.main" on every worker (--worker=all) with the
           workdir in the bucket itself (a gs:// URL, written through etils.epath
           and Orbax; the memory-mapped caches stay on each worker's local disk:
           see the README), after mounting gs://BUCKET at $REMOTE_MOUNTS/BUCKET
           with gcsfuse (where it is not mounted yet) for TFDS_DATA_DIR: the
           prepared data sets are array_record files, which are read from local
           paths only. Each worker tees its output into
           $REMOTE_LOGS/RUN_NAME.worker-\$(hostname).log; the script prints how
           to fetch the logs.
  ssh      open a shell on a worker, or run "-- COMMAND..." on the workers chosen
           by --worker (the words after -- are joined with spaces, as ssh does)
  delete   delete the TPU VM

Settings (a flag wins over the environment variable, which wins over the default):
  --name=NAME           TPU_NAME          default: mstkd-tpu
  --zone=ZONE           TPU_ZONE          default: us-central2-b
  --accelerator=TYPE    TPU_ACCELERATOR   default: v4-8
  --version=VERSION     TPU_VERSION       default: tpu-ubuntu2204-base
  --project=PROJECT     GCP_PROJECT       default: gcloud's configured project
  --bucket=BUCKET       GCS_BUCKET        required by run (with or without gs://)

Options:
  --spot                   create: make a Spot TPU VM (cheaper, can be preempted)
  --config=FILE[:PRESET]   run: the config (default: configs/distill.py)
  --config.KEY=VALUE       run: config override, passed through to mstkd_jax.main
  --run-name=NAME          run: names the default workdir and the log files
                           (default: mstkd-YYYYmmdd-HHMMSS; letters, digits, . _ -)
  --workdir=URL|PATH       run: default gs://BUCKET/mstkd_jax/workdirs/RUN_NAME
                           (a URL, or a path every worker sees)
  --gcsfuse                run: the default workdir is a folder of the mount instead,
                           $REMOTE_MOUNTS/BUCKET/mstkd_jax/workdirs/RUN_NAME
  --tfds-data-dir=PATH     run: default $REMOTE_MOUNTS/BUCKET/tensorflow_datasets
                           (a local path: URLs are refused)
  --detach                 run: start in the background (nohup) on every worker
                           and return at once; output goes only to the log files
  --worker=W               ssh: worker index, list (1,3), range (0-3) or "all"
                           (default 0; more than one worker needs a command)
  --yes                    delete: do not ask for confirmation
  --dry-run                print the commands (one per line, prefixed "+ ",
                           shell-quoted) instead of running them
  -h, --help               show this help
  -- ARGS...               run: further arguments for mstkd_jax.main
                           (e.g. -- --multihost=auto); ssh: the remote command

Options take "--opt=value" or "--opt value". run passes --multihost=true (before
the words after --, which can override it): jax.distributed.initialize() then
finds the slice's hosts from the TPU VM metadata (on a single host: a cluster of
one process).

Examples:
  export GCP_PROJECT=my-project GCS_BUCKET=my-bucket
  launch/$PROG create --accelerator=v4-32 --zone=us-central2-b
  launch/$PROG setup
  launch/$PROG run --run-name=distill1 --config=configs/distill.py
  launch/$PROG run --detach --run-name=distill2 --config=configs/distill.py:PRESET --config.KEY=VALUE
  launch/$PROG ssh --worker=all -- 'tail -n 20 ~/mstkd_logs/distill2.*.log'
  launch/$PROG ssh --worker=all -- pkill -f mstkd_jax.main     # stop a detached run
  launch/$PROG run --dry-run --bucket=my-bucket                 # only print the gcloud commands
  launch/$PROG delete --yes
EOF
}


need_gcloud() {
  if ((dry_run)); then
    return 0
  fi
  if ! command -v gcloud >/dev/null 2>&1; then
    die "'gcloud' was not found on PATH. Install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'" \
      "(or use --dry-run to only print the commands)."
  fi
}


# ---------------------------------------------------------------- arguments
cmd=''
dry_run=0
spot=0
detach=0
yes=0
gcsfuse=0
name=${TPU_NAME:-mstkd-tpu}
zone=${TPU_ZONE:-us-central2-b}
accelerator=${TPU_ACCELERATOR:-v4-8}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
project=${GCP_PROJECT:-}
bucket=${GCS_BUCKET:-}
config=configs/distill.py
run_name=''
workdir=''
tfds_dir=''
worker=0
extra=()
scoped=() # "flag|commands it belongs to"

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --spot) spot=1; scoped+=("--spot|create"); shift ;;
    --detach) detach=1; scoped+=("--detach|run"); shift ;;
    --yes) yes=1; scoped+=("--yes|delete"); shift ;;
    --gcsfuse) gcsfuse=1; scoped+=("--gcsfuse|run"); shift ;;
    --name | --name=*) optval "$@"; name=$OPTVAL; shift "$OPTSHIFT" ;;
    --zone | --zone=*) optval "$@"; zone=$OPTVAL; shift "$OPTSHIFT" ;;
    --accelerator | --accelerator=*) optval "$@"; accelerator=$OPTVAL; shift "$OPTSHIFT" ;;
    --version | --version=*) optval "$@"; version=$OPTVAL; shift "$OPTSHIFT" ;;
    --project | --project=*) optval "$@"; project=$OPTVAL; shift "$OPTSHIFT" ;;
    --bucket | --bucket=*) optval "$@"; bucket=$OPTVAL; shift "$OPTSHIFT" ;;
    --config | --config=*) optval "$@"; config=$OPTVAL; scoped+=("--config|run"); shift "$OPTSHIFT" ;;
    --config.*) extra+=("$1"); scoped+=("--config.*|run"); shift ;;
    --run-name | --run-name=*) optval "$@"; run_name=$OPTVAL; scoped+=("--run-name|run"); shift "$OPTSHIFT" ;;
    --workdir | --workdir=*) optval "$@"; workdir=$OPTVAL; scoped+=("--workdir|run"); shift "$OPTSHIFT" ;;
    --tfds-data-dir | --tfds-data-dir=*) optval "$@"; tfds_dir=$OPTVAL; scoped+=("--tfds-data-dir|run"); shift "$OPTSHIFT" ;;
    --worker | --worker=*) optval "$@"; worker=$OPTVAL; scoped+=("--worker|ssh"); shift "$OPTSHIFT" ;;
    --) shift; extra+=("$@"); scoped+=("-- ARGS|run ssh"); break ;;
    -*) die "unknown option: $1 (see '$PROG --help')" ;;
    *) take_command "$1"; shift ;;
  esac
done

case $cmd in
  create | setup | run | ssh | delete) ;;
  '') usage >&2; die "no command given (create, setup, run, ssh or delete)" ;;
  *) die "unknown command: $cmd (expected create, setup, run, ssh or delete)" ;;
esac

check_scoped

for pair in "name:$name" "zone:$zone" "accelerator:$accelerator" "version:$version"; do
  if [[ -z ${pair#*:} ]]; then
    die "--${pair%%:*} must not be empty"
  fi
done

bucket=${bucket#gs://}
bucket=${bucket%/}

where=(--zone="$zone")
if [[ -n $project ]]; then
  where+=(--project="$project")
fi
tpu=(gcloud compute tpus tpu-vm)

# ---------------------------------------------------------------- commands
do_create() {
  local c=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version")
  if ((spot)); then
    c+=(--spot)
  fi
  need_gcloud
  run_cmd "${c[@]}"
  note "next: launch/$PROG setup (with the same --name/--zone/--project)"
}

# Packs the checkout into $1: tracked and untracked-but-not-ignored files
# (so .git/, the venv and workdir/ stay out), or, outside git, everything but
# .git, venvs and workdirs.
pack_repo() {
  local out=$1
  if command -v git >/dev/null 2>&1 && git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    if ((dry_run)); then
      printf '+ %s\n' "(cd $(q "$REPO") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(q "$out") -T -)"
      return 0
    fi
    printf '+ packing %s (git ls-files: tracked + untracked, not ignored) into %s\n' "$REPO" "$out" >&2
    (
      cd -- "$REPO"
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          case $f in
            workdir/* | workdirs/* | .venv/* | venv/*) continue ;;
          esac
          # Skip tracked files deleted in the working tree.
          if [[ -e $f ]]; then
            printf '%s\0' "$f"
          fi
        done |
        tar --null -czf "$out" -T -
    )
  else
    run_cmd tar -czf "$out" --exclude=.git --exclude=./workdir --exclude=./workdirs \
      --exclude=./.venv --exclude=./venv --exclude=__pycache__ -C "$REPO" .
  fi
}

remote_setup_command() {
  local py_ok='-c "import sys; sys.exit(sys.version_info < (3, 11))"'
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600'
  local steps=(
    'set -euo pipefail'
    "echo \"[\$(hostname)] unpacking the code into $REMOTE_CODE\""
    "rm -rf $REMOTE_CODE"
    "mkdir -p $REMOTE_CODE"
    "tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_CODE"
    "rm -f ~/$REMOTE_TARBALL"
    "apt_install() { $apt update -qq && $apt install -y -qq \"\$@\"; }"
    # JAX >= 0.7 needs Python >= 3.11; Ubuntu 22.04 images ship 3.10.
    "py=python3; if ! python3 $py_ok 2>/dev/null; then py=python3.11; command -v python3.11 >/dev/null || apt_install python3.11 python3.11-venv; fi"
    "if [ -x $REMOTE_VENV/bin/python ] && ! $REMOTE_VENV/bin/python $py_ok; then rm -rf $REMOTE_VENV; fi"
    "if [ ! -x $REMOTE_VENV/bin/python ]; then \"\$py\" -m venv $REMOTE_VENV 2>/dev/null || { apt_install \"\$py-venv\" && rm -rf $REMOTE_VENV && \"\$py\" -m venv $REMOTE_VENV; }; fi"
    "$REMOTE_VENV/bin/python -m pip install -q -U pip"
    "$REMOTE_VENV/bin/python -m pip install -q -r $REMOTE_CODE/requirements.txt"
    "$REMOTE_VENV/bin/python -m pip install -q \"jax[$JAX_EXTRA]==\$($REMOTE_VENV/bin/python -c 'import jax; print(jax.__version__)')\""
    "command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && apt_install gcsfuse; }"
    "echo \"[\$(hostname)] ready: \$($REMOTE_VENV/bin/python -c 'import jax; print(\"jax\", jax.__version__)')\""
  )
  local out='' s
  for s in "${steps[@]}"; do
    out+=${out:+; }$s
  done
  printf '%s' "$out"
}

do_setup() {
  need_gcloud
  if [[ ! -f $REPO/requirements.txt ]]; then
    die "$REPO/requirements.txt not found; is this script inside the mstkd_jax checkout?"
  fi
  local tarball
  if ((dry_run)); then
    tarball=${TMPDIR:-/tmp}/$REMOTE_TARBALL
  else
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mstkd_tpu.XXXXXX")
    trap 'rm -rf "$TMP_DIR"' EXIT
    tarball=$TMP_DIR/$REMOTE_TARBALL
  fi
  pack_repo "$tarball"
  run_cmd "${tpu[@]}" scp "$tarball" "$name:$REMOTE_TARBALL" --worker=all "${where[@]}"
  run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$(remote_setup_command)"
  note "next: launch/$PROG run --bucket=BUCKET --config=... (with the same --name/--zone/--project)"
}

do_run() {
  if [[ -z $bucket ]]; then
    die "run needs a GCS bucket for the workdir and the datasets: --bucket=NAME or GCS_BUCKET=NAME"
  fi
  check_run_name
  local mount=$REMOTE_MOUNTS/$bucket root=gs://$bucket
  if ((gcsfuse)); then
    root=$mount
  fi
  workdir=${workdir:-$root/mstkd_jax/workdirs/$run_name}
  tfds_dir=${tfds_dir:-$mount/tensorflow_datasets}
  if [[ $tfds_dir =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
    die "--tfds-data-dir=$tfds_dir is a URL; the prepared data sets are array_record" \
      "files, which are read from local paths only. gs://$bucket is mounted at $mount on" \
      "every worker: give a folder under it (e.g. --tfds-data-dir=$mount/...)"
  fi
  need_gcloud

  local log="$REMOTE_LOGS/$run_name.worker-\$(hostname).log"
  local main
  main="$REMOTE_VENV/bin/python -m mstkd_jax.main $(fmt_cmd --config="$config" --workdir="$workdir" --multihost=true ${extra[@]+"${extra[@]}"})"
  local remote
  # --rename-dir-limit: Orbax finalizes a checkpoint by renaming its temporary folder.
  remote="set -eo pipefail; mkdir -p $REMOTE_LOGS; "
  if [[ $workdir == "$mount" || $workdir == "$mount"/* || $tfds_dir == "$mount" || $tfds_dir == "$mount"/* ]]; then
    remote+="if ! mountpoint -q $(q "$mount"); then sudo mkdir -p $(q "$mount") && sudo chown \$(id -u):\$(id -g) $(q "$mount") && gcsfuse --implicit-dirs --rename-dir-limit=1000000 $(q "$bucket") $(q "$mount"); fi; "
  fi
  remote+="cd $REMOTE_CODE; export TFDS_DATA_DIR=$(q "$tfds_dir") PYTHONUNBUFFERED=1; "
  if ((detach)); then
    remote+="nohup $main >> $log 2>&1 < /dev/null & echo \"[\$(hostname)] started pid \$!, log: $log\""
  else
    remote+="echo \"[\$(hostname)] log: $log\"; $main 2>&1 | tee -a $log"
  fi

  local status=0
  run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote" || status=$?

  local w
  w=$(fmt_cmd "${where[@]}")
  note "workdir (checkpoints, summaries): $workdir"
  note "logs: every worker writes $REMOTE_LOGS/$run_name.worker-<hostname>.log. To see them:"
  note "  launch/$PROG ssh $w --name=$(q "$name") --worker=all -- tail -n 50 '$REMOTE_LOGS/$run_name.*.log'"
  note "to fetch them (worker 0; repeat with --worker=1, 2, ... for the other hosts of a pod slice):"
  note "  mkdir -p mstkd_logs && gcloud compute tpus tpu-vm scp $(q "$name:mstkd_logs/$run_name.*") mstkd_logs/ --worker=0 $w"
  return "$status"
}

do_ssh() {
  local c=("${tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker")
  if ! [[ $worker =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]]; then
    die "--worker must be an index, a list (1,3), a range (0-3) or 'all' (got: $worker)"
  fi
  if ((${#extra[@]})); then
    c+=(--command="${extra[*]}")
  elif ! [[ $worker =~ ^[0-9]+$ ]]; then
    die "--worker=$worker needs a command: launch/$PROG ssh --worker=$worker -- COMMAND"
  fi
  need_gcloud
  run_cmd "${c[@]}"
}

do_delete() {
  local c=("${tpu[@]}" delete "$name" "${where[@]}")
  if ((yes)); then
    c+=(--quiet)
  fi
  need_gcloud
  run_cmd "${c[@]}"
}

"do_$cmd"
