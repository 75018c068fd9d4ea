# Helpers shared by the launch scripts, sourced first thing (the caller sets SCRIPT_DIR, its
# own folder, and later dry_run, and for the command and setup helpers cmd, scoped, python
# and venv; for the GPU launchers' also main_cmd, config, extra, run_name, workdir and
# tfds_dir, and a usage function).
# shellcheck shell=bash disable=SC2034,SC2154

PROG=${0##*/}
REPO=$(cd -- "$SCRIPT_DIR/.." && pwd)

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

SAFE_RE='^[A-Za-z0-9_./:=,+@%-]+$'
OPT_RE='^(-{0,2}[A-Za-z_][A-Za-z0-9_.-]*=)(.*)$'
# Shell-quote one word (single quotes unless it only has harmless characters).
q() {
  if [[ $1 =~ $SAFE_RE ]]; then
    printf '%s' "$1"
  else
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
  fi
}

# Like q, but "--opt=some value" becomes --opt='some value'; the same for NAME=value.
qw() {
  if [[ $1 =~ $SAFE_RE ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ $OPT_RE ]]; then
    local head=${BASH_REMATCH[1]} tail=${BASH_REMATCH[2]}
    printf '%s' "$head"
    q "$tail"
  else
    q "$1"
  fi
}

# Absolute form of a local path (relative to the current directory); URIs stay.
abspath() {
  case $1 in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}

fmt_cmd() {
  local a sep=''
  for a in "$@"; do
    printf '%s' "$sep"
    qw "$a"
    sep=' '
  done
}

# Dry run: print the command to stdout. Otherwise echo it to stderr and run it.
run_cmd() {
  if ((dry_run)); then
    printf '+ %s\n' "$(fmt_cmd "$@")"
  else
    printf '+ %s\n' "$(fmt_cmd "$@")" >&2
    "$@"
  fi
}

# Reads the value of an option given as --opt=value or as --opt value.
# Sets OPTVAL and OPTSHIFT (how many words to shift).
optval() {
  if [[ $1 == *=* ]]; then
    OPTVAL=${1#*=}
    OPTSHIFT=1
  elif (($# >= 2)) && [[ $2 != --* ]]; then
    OPTVAL=$2
    OPTSHIFT=2
  else
    die "option $1 needs a value"
  fi
}

# The COMMAND word of a launcher: the first bare word sets cmd; a second one is refused.
take_command() {
  if [[ -n $cmd ]]; then
    die "unexpected argument: $1 (arguments for mstkd_jax.main go after --; see '$PROG --help')"
  fi
  cmd=$1
}

# Refuses options given to another command: each entry of scoped is "flag|commands".
check_scoped() {
  local s
  for s in ${scoped[@]+"${scoped[@]}"}; do
    if [[ " ${s#*|} " != *" $cmd "* ]]; then
      die "${s%%|*} is not an option of '$cmd' (see '$PROG --help')"
    fi
  done
}

# The run name: mstkd-YYYYmmdd-HHMMSS when none was given. It names folders and files, so
# it may only hold letters, digits, '.', '_' and '-'.
check_run_name() {
  if [[ -z $run_name ]]; then
    run_name=mstkd-$(date +%Y%m%d-%H%M%S)
  fi
  if ! [[ $run_name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    die "--run-name may only use letters, digits, '.', '_' and '-' (got: $run_name)"
  fi
}

# The arguments both GPU launchers take, one at a time: handles $1 (and its value; pass
# every argument left) and sets OPTSHIFT to the words it took. --python is setup's; the
# options of the run belong to $main_cmd, the command that runs mstkd_jax.main. A bare
# word is the COMMAND; "--" takes all the rest as arguments for mstkd_jax.main.
gpu_option() {
  OPTSHIFT=1
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --venv | --venv=*) optval "$@"; venv=$OPTVAL ;;
    --python | --python=*) optval "$@"; python=$OPTVAL; scoped+=("--python|setup") ;;
    --config | --config=*) optval "$@"; config=$OPTVAL; scoped+=("--config|$main_cmd") ;;
    --config.*) extra+=("$1"); scoped+=("--config.*|$main_cmd") ;;
    --run-name | --run-name=*) optval "$@"; run_name=$OPTVAL; scoped+=("--run-name|$main_cmd") ;;
    --workdir | --workdir=*) optval "$@"; workdir=$OPTVAL; scoped+=("--workdir|$main_cmd") ;;
    --tfds-data-dir | --tfds-data-dir=*) optval "$@"; tfds_dir=$OPTVAL; scoped+=("--tfds-data-dir|$main_cmd") ;;
    --) extra+=("${@:2}"); scoped+=("-- ARGS|$main_cmd"); OPTSHIFT=$# ;;
    -*) die "unknown option: $1 (see '$PROG --help')" ;;
    *) take_command "$1" ;;
  esac
}

# After a GPU launcher's arguments: each option belongs to the command given, and the venv
# is named.
check_gpu_options() {
  check_scoped
  if [[ -z $venv ]]; then
    die "--venv must not be empty"
  fi
}

# The paths a GPU launcher's run gives mstkd_jax.main, which runs from the repo root: the
# run name checked (check_run_name), the workdir (default <repo>/workdir/RUN_NAME), the venv
# and the TFDS data folder made absolute.
gpu_run_paths() {
  check_run_name
  workdir=$(abspath "${workdir:-$REPO/workdir/$run_name}")
  venv=$(abspath "$venv")
  if [[ -n $tfds_dir ]]; then
    tfds_dir=$(abspath "$tfds_dir")
  fi
}

CUDA_JAX_EXTRA='cuda12'  # pip's jax[cuda12]: the CUDA 12 plugin of the locked JAX version

# setup of the GPU launchers: checks $python (>= 3.11), makes $venv and installs
# requirements.txt (the lock: CPU JAX among exact versions), then jax[$CUDA_JAX_EXTRA] of
# the same JAX version (the CUDA plugin; a plugin must match its jaxlib). $1: what else to
# try where $python is missing.
make_cuda_venv() {
  if ((!dry_run)); then
    if ! command -v "$python" >/dev/null 2>&1; then
      die "'$python' not found; install Python >= 3.11$1 or pass --python=/path/to/python3.11"
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      die "JAX >= 0.7 needs Python >= 3.11, but $python is $("$python" -c 'import sys; print(sys.version.split()[0])'); pass --python=python3.11 (or newer)"
    fi
  fi
  run_cmd "$python" -m venv "$venv"
  run_cmd "$venv/bin/python" -m pip install -U pip
  run_cmd "$venv/bin/python" -m pip install -r "$REPO/requirements.txt"
  local version='<the JAX version of the lock>'
  if ((!dry_run)); then
    version=$("$venv/bin/python" -c 'import jax; print(jax.__version__)')
  fi
  run_cmd "$venv/bin/python" -m pip install "jax[$CUDA_JAX_EXTRA]==$version"
}
