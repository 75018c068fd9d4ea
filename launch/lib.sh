# Helpers shared by the launch scripts (sourced; the caller sets PROG and dry_run).
# shellcheck shell=bash disable=SC2034,SC2154

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
