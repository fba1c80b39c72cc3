#!/usr/bin/env bash
# Tail a job's log on TPU worker 0 (or on all workers).
set -euo pipefail

RLM_PROG="logs.sh"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
JOB=""
NLINES=100
FOLLOW=1
LIST=0

rlm_usage() {
  cat <<'EOF'
Usage: tpu_scripts/logs.sh [options]

Follow the log that run.sh writes on the workers (~/rlm-logs/latest.log, or
the newest ~/rlm-logs/<job>-*.log with --job) on worker 0, or on every worker
with --all. Ctrl-C stops tailing; the job keeps running.

Required: TPU_NAME, TPU_ZONE, TPU_PROJECT.

Script options:
  --job NAME       newest log of this job instead of latest.log
  --all            tail on all workers (same as --worker all)
  --worker W       worker index or "all" (default: 0)
  --lines N        lines of history to show first (default: 100)
  --no-follow      print the last lines and exit
  --list           list the log files instead of tailing

EOF
  rlm_common_help
}

rlm_script_option() {
  case "$1" in
    --job) rlm_need_value "$@"; JOB="$2" ;;
    --all) WORKER=all; RLM_CONSUMED=1 ;;
    --worker) rlm_need_value "$@"; WORKER="$2" ;;
    --lines) rlm_need_value "$@"; NLINES="$2" ;;
    --no-follow) FOLLOW=0; RLM_CONSUMED=1 ;;
    --list) LIST=1; RLM_CONSUMED=1 ;;
    *) return 1 ;;
  esac
}

rlm_parse_args "$@"
rlm_require TPU_NAME TPU_ZONE TPU_PROJECT
rlm_check_worker "$WORKER"
((${#RLM_CMD[@]} == 0)) || rlm_die "logs.sh takes no command"
[[ "$NLINES" =~ ^[0-9]+$ ]] || rlm_die "--lines must be a number (got '$NLINES')"
if [[ -n "$JOB" && ! "$JOB" =~ ^[A-Za-z0-9._-]+$ ]]; then
  rlm_die "--job may only use letters, digits, '.', '_' and '-' (got '$JOB')"
fi

d="$RLM_REMOTE_LOG_DIR"
if [[ "$LIST" == 1 ]]; then
  script="ls -lt $d/"
else
  if [[ -n "$JOB" ]]; then
    # shellcheck disable=SC2016  # $f is a variable of the remote shell
    script='f=$(ls -t '"$d/$JOB"'-*.log | head -n 1);'
  else
    script="f=$d/latest.log;"
  fi
  flags="-n $NLINES"
  if [[ "$FOLLOW" == 1 ]]; then flags+=" -F"; fi
  # shellcheck disable=SC2016
  script+=' echo "== $(hostname): $f";'" tail $flags"' "$f"'
fi

rlm_ssh "$WORKER" "$script"
