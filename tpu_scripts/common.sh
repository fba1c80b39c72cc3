#!/usr/bin/env bash
# shellcheck shell=bash
# shellcheck disable=SC2034  # variables here are used by the sourcing scripts
#
# Shared helpers for the tpu_scripts/*.sh launchers. Sourced, not executed.
#
# Settings come from environment variables; command-line flags override them:
#
#   TPU_NAME      name of the TPU VM / pod slice            (--name)
#   TPU_ZONE      GCP zone, e.g. us-west4-a                  (--zone)
#   TPU_PROJECT   GCP project id                             (--project)
#   TPU_TYPE      accelerator type, e.g. v5litepod-8, v4-32  (--type)
#   TPU_RUNTIME   TPU software version                       (--runtime)
#                 (default derived from TPU_TYPE, e.g. v2-alpha-tpuv5-lite)
#   TPU_SPOT      1 = Spot VM, 0 = on-demand (default 0)     (--spot / --no-spot)
#   TPU_QUEUED    1 = use queued resources (default 0)       (--queued)
#   TPU_SSH_FLAGS extra flags for every `tpu-vm ssh/scp`, e.g. "--internal-ip"
#   GCLOUD        gcloud binary (default: gcloud)
#   RLM_DRY_RUN   1 = same as --dry-run
#
# Each script sets RLM_PROG, defines rlm_usage (and optionally
# rlm_script_option), then calls `rlm_parse_args "$@"`.
#
# Written for bash >= 3.2 (macOS system bash): no associative arrays, no
# ${var,,}, and empty arrays are expanded as ${a[@]+"${a[@]}"} under `set -u`.

RLM_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RLM_REPO_ROOT="$(cd "$RLM_SCRIPTS_DIR/.." && pwd)"

# Pinned JAX version for the TPU install (matches pyproject.toml).
RLM_JAX_VERSION_DEFAULT="0.10.2"
# Where the repo and the venv live on every TPU worker. A literal `~/` prefix
# is left for the *remote* shell to expand; never quote it in remote scripts.
# shellcheck disable=SC2088  # the tilde is expanded on the worker, not here
{
  [[ -n "${RLM_REMOTE_DIR:-}" ]] || RLM_REMOTE_DIR='~/recursive_lm'
  [[ -n "${RLM_REMOTE_VENV:-}" ]] || RLM_REMOTE_VENV='~/rlm-venv'
  [[ -n "${RLM_REMOTE_LOG_DIR:-}" ]] || RLM_REMOTE_LOG_DIR='~/rlm-logs'
}

GCLOUD="${GCLOUD:-gcloud}"
TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-}"
TPU_RUNTIME="${TPU_RUNTIME:-}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_QUEUED="${TPU_QUEUED:-0}"
TPU_SSH_FLAGS="${TPU_SSH_FLAGS:-}"
RLM_DRY_RUN="${RLM_DRY_RUN:-0}"
RLM_PROG="${RLM_PROG:-$(basename "$0")}"

# Positional words after `--` (or, for scripts that set RLM_ACCEPTS_CMD=1,
# after the first non-option word).
RLM_CMD=()

# ---------------------------------------------------------------- messages ---

# Configuration / usage error: one line on stderr, exit 2.
rlm_die() {
  echo "$RLM_PROG: error: $*" >&2
  exit 2
}

# Runtime failure (a command failed, a wait timed out): exit 1.
rlm_fail() {
  echo "$RLM_PROG: error: $*" >&2
  exit 1
}

rlm_info() {
  echo "[$RLM_PROG] $*" >&2
}

# ----------------------------------------------------------------- quoting ---

# Print one word shell-quoted so that it can be pasted into bash/zsh.
# Plain words are printed as-is; everything else is single-quoted.
rlm_quote_word() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    local q="'\\''"
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Print all arguments shell-quoted, space separated (no trailing newline).
rlm_quote_cmd() {
  local first=1 w
  for w in "$@"; do
    if ((first)); then first=0; else printf ' '; fi
    rlm_quote_word "$w"
  done
}

# Like rlm_quote_cmd, but into the variable named by $1.
rlm_quote_into() {
  local __var="$1"
  shift
  local __s
  __s="$(rlm_quote_cmd "$@")"
  printf -v "$__var" '%s' "$__s"
}

# ----------------------------------------------------------------- running ---

# rlm_run CMD ARGS...: in dry-run print the command (one line, pasteable) on
# stdout; otherwise echo it to stderr and execute it.
rlm_run() {
  if [[ "$RLM_DRY_RUN" == 1 ]]; then
    rlm_quote_cmd "$@"
    printf '\n'
    return 0
  fi
  echo "+ $(rlm_quote_cmd "$@")" >&2
  "$@"
}

# rlm_run_shell 'pipeline string': for the few steps that need a pipe. The
# string is printed verbatim in dry-run, else run by `bash -o pipefail -c`.
rlm_run_shell() {
  if [[ "$RLM_DRY_RUN" == 1 ]]; then
    printf '%s\n' "$1"
    return 0
  fi
  echo "+ $1" >&2
  bash -o pipefail -c "$1"
}

# rlm_run_tee LOGFILE CMD ARGS...: run CMD with stdout+stderr streamed to the
# terminal and appended to LOGFILE. Exit status is CMD's.
rlm_run_tee() {
  local log="$1"
  shift
  if [[ "$RLM_DRY_RUN" == 1 ]]; then
    printf '%s 2>&1 | tee -a %s\n' "$(rlm_quote_cmd "$@")" "$(rlm_quote_word "$log")"
    return 0
  fi
  echo "+ $(rlm_quote_cmd "$@") 2>&1 | tee -a $(rlm_quote_word "$log")" >&2
  local rc=0
  set +e
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

# ----------------------------------------------------------------- parsing ---

rlm_bool() {  # normalise 1/0/true/false/yes/no/on/off -> 1/0, else die
  case "$2" in
    1 | true | TRUE | True | yes | YES | on | ON) printf 1 ;;
    0 | false | FALSE | False | no | NO | off | OFF | "") printf 0 ;;
    *) rlm_die "$1 must be 0 or 1 (got '$2')" ;;
  esac
}

rlm_common_help() {
  cat <<'EOF'
Common options (flags override the environment variables):
  --name NAME        TPU VM / pod slice name           [TPU_NAME]
  --zone ZONE        GCP zone, e.g. us-west4-a          [TPU_ZONE]
  --project PROJECT  GCP project id                     [TPU_PROJECT]
  --type TYPE        accelerator type, e.g. v5litepod-8 or v4-32   [TPU_TYPE]
  --runtime VERSION  TPU software version (default from --type)    [TPU_RUNTIME]
  --spot / --no-spot Spot (preemptible-at-any-time) capacity       [TPU_SPOT=0/1]
  --queued           go through queued resources (create/delete)   [TPU_QUEUED=0/1]
  -n, --dry-run      print the exact commands, one per line; run nothing [RLM_DRY_RUN=1]
  -h, --help         show this help and exit
Other environment: TPU_SSH_FLAGS (extra flags for tpu-vm ssh/scp, e.g.
"--internal-ip" or "--tunnel-through-iap"), GCLOUD (gcloud binary).
A missing required setting is reported on one line and the script exits 2.
EOF
}

# rlm_parse_args "$@": handles the common flags; script-specific flags go to
# rlm_script_option OPT [VALUE...], which must set RLM_CONSUMED (1 or 2) and
# return 0, or return 1 for an unknown option.
rlm_parse_args() {
  local opt val
  while (($# > 0)); do
    opt="$1"
    # Split --opt=value into two words so both spellings are accepted.
    if [[ "$opt" == --*=* ]]; then
      val="${opt#*=}"
      opt="${opt%%=*}"
      shift
      set -- "$opt" "$val" "$@"
    fi
    case "$opt" in
      -h | --help)
        rlm_usage
        exit 0
        ;;
      -n | --dry-run) RLM_DRY_RUN=1; shift ;;
      --spot) TPU_SPOT=1; shift ;;
      --no-spot) TPU_SPOT=0; shift ;;
      --queued) TPU_QUEUED=1; shift ;;
      --name | --zone | --project | --type | --runtime)
        (($# >= 2)) || rlm_die "$opt needs a value"
        case "$opt" in
          --name) TPU_NAME="$2" ;;
          --zone) TPU_ZONE="$2" ;;
          --project) TPU_PROJECT="$2" ;;
          --type) TPU_TYPE="$2" ;;
          --runtime) TPU_RUNTIME="$2" ;;
        esac
        shift 2
        ;;
      --)
        shift
        RLM_CMD=("$@")
        break
        ;;
      -*)
        RLM_CONSUMED=0
        if declare -F rlm_script_option >/dev/null && rlm_script_option "$@"; then
          shift "$RLM_CONSUMED"
        else
          rlm_die "unknown option '$opt' (see --help)"
        fi
        ;;
      *)
        if [[ "${RLM_ACCEPTS_CMD:-0}" == 1 ]]; then
          RLM_CMD=("$@")
          break
        fi
        rlm_die "unexpected argument '$opt' (see --help)"
        ;;
    esac
  done
  TPU_SPOT="$(rlm_bool TPU_SPOT "$TPU_SPOT")"
  TPU_QUEUED="$(rlm_bool TPU_QUEUED "$TPU_QUEUED")"
  RLM_DRY_RUN="$(rlm_bool RLM_DRY_RUN "$RLM_DRY_RUN")"
  export TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME TPU_SPOT TPU_QUEUED \
    TPU_SSH_FLAGS GCLOUD RLM_DRY_RUN
}

# Helper for rlm_script_option: require a value after option $1.
rlm_need_value() {
  (($# >= 2)) || rlm_die "$1 needs a value"
  RLM_CONSUMED=2
}

# rlm_require VAR...: die (exit 2, one line) naming every unset setting.
rlm_require() {
  local v missing=""
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then
      missing="${missing:+$missing, }$v ($(rlm_flag_for "$v"))"
    fi
  done
  if [[ -n "$missing" ]]; then
    rlm_die "missing required setting: $missing; export the variable or pass the flag"
  fi
}

rlm_flag_for() {
  case "$1" in
    TPU_NAME) printf -- '--name' ;;
    TPU_ZONE) printf -- '--zone' ;;
    TPU_PROJECT) printf -- '--project' ;;
    TPU_TYPE) printf -- '--type' ;;
    TPU_RUNTIME) printf -- '--runtime' ;;
    *) printf -- '-' ;;
  esac
}

# Default software version for an accelerator type (Cloud TPU docs, "TPU
# software versions": the base images for JAX/PyTorch).
rlm_default_runtime() {
  local t
  t="$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')"
  case "$t" in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

# Fill TPU_RUNTIME from TPU_TYPE when unset; die if it cannot be derived.
rlm_resolve_runtime() {
  if [[ -z "$TPU_RUNTIME" ]]; then
    TPU_RUNTIME="$(rlm_default_runtime "$TPU_TYPE")" ||
      rlm_die "missing required setting: TPU_RUNTIME (--runtime); no default for TPU_TYPE '$TPU_TYPE'"
  fi
}

# -------------------------------------------------------- gcloud builders ---

# Location flags shared by every gcloud call.
rlm_loc_flags() {
  RLM_LOC=("--zone=$TPU_ZONE" "--project=$TPU_PROJECT")
}

# Extra user flags for ssh/scp (word-split on purpose).
rlm_ssh_extra() {
  RLM_SSH_EXTRA=()
  if [[ -n "$TPU_SSH_FLAGS" ]]; then
    # shellcheck disable=SC2206  # intentional word splitting of user flags
    RLM_SSH_EXTRA=($TPU_SSH_FLAGS)
  fi
}

# rlm_ssh WORKER 'remote script': run a script on worker(s) of the TPU VM.
rlm_ssh_argv() {
  local worker="$1" script="$2"
  rlm_loc_flags
  rlm_ssh_extra
  RLM_ARGV=("$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${RLM_LOC[@]}"
    "--worker=$worker" ${RLM_SSH_EXTRA[@]+"${RLM_SSH_EXTRA[@]}"} "--command=$script")
}

rlm_ssh() {
  rlm_ssh_argv "$1" "$2"
  rlm_run "${RLM_ARGV[@]}"
}

# Validate a --worker value: "all" or a non-negative integer.
rlm_check_worker() {
  [[ "$1" == all || "$1" =~ ^[0-9]+$ ]] || rlm_die "--worker must be 'all' or a worker index (got '$1')"
}

rlm_timestamp() {
  date -u +%Y%m%d-%H%M%S
}

# Poll `CMD...` (prints a state) until it prints WANT. States matching the
# extended regex BAD abort. Skipped in dry-run.
#   rlm_wait_for_state LABEL WANT BAD CMD...
rlm_wait_for_state() {
  local label="$1" want="$2" bad="$3"
  shift 3
  if [[ "$RLM_DRY_RUN" == 1 ]]; then
    rlm_info "dry-run: not waiting for $label to reach $want"
    return 0
  fi
  local timeout="${RLM_WAIT_TIMEOUT:-3600}" interval="${RLM_POLL_INTERVAL:-15}"
  local start=$SECONDS state last=""
  while :; do
    state="$("$@" 2>/dev/null || true)"
    state="$(printf '%s' "$state" | tr -d '[:space:]')"
    if [[ "$state" != "$last" ]]; then
      rlm_info "$label: ${state:-<not found yet>}"
      last="$state"
    fi
    if [[ "$state" == "$want" ]]; then
      return 0
    fi
    if [[ -n "$state" && "$state" =~ ^($bad)$ ]]; then
      rlm_fail "$label entered state $state"
    fi
    if ((SECONDS - start >= timeout)); then
      rlm_fail "timed out after ${timeout}s waiting for $label to reach $want (last: ${state:-none})"
    fi
    sleep "$interval"
  done
}
