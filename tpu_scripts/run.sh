#!/usr/bin/env bash
# Run a command on every TPU worker, streaming and saving its output.
set -euo pipefail

RLM_PROG="run.sh"
RLM_ACCEPTS_CMD=1
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=all
JOB=""
DETACH=0
DISTRIBUTED=1
REMOTE_LOG=1
LOG_DIR="${RLM_LOG_DIR:-$RLM_REPO_ROOT/logs}"
ENVS=()

rlm_usage() {
  cat <<'EOF'
Usage: tpu_scripts/run.sh [options] -- CMD [ARGS...]

Run CMD on every worker (--worker=all) inside ~/recursive_lm with the venv
activated and RLM_DISTRIBUTED=1 exported, so the training CLI calls
jax.distributed.initialize() (on TPU, JAX finds the coordinator, the number
of processes and this process's id itself). The same command runs on every
host of a pod slice, as multi-host JAX requires.

Output of all workers streams to stdout and is also appended to
logs/<job>-<UTC timestamp>.log locally; each worker additionally writes
~/rlm-logs/<job>-<timestamp>.log (with ~/rlm-logs/latest.log pointing at it),
which tpu_scripts/logs.sh tails.

Example:
  tpu_scripts/run.sh -- python -m recursive_lm.train \
      --config configs/default.py --workdir gs://bucket/run1

Required: TPU_NAME, TPU_ZONE, TPU_PROJECT.

Script options:
  --job NAME         log name (default: TPU_NAME)
  --env KEY=VALUE    export KEY=VALUE on the workers (repeatable)
  --detach           start CMD under nohup and return; follow it with logs.sh
                     (survives a dropped ssh connection)
  --no-distributed   do not export RLM_DISTRIBUTED=1
  --no-remote-log    no ~/rlm-logs file, latest.log untouched (quick commands)
  --worker W         one worker index instead of all (default: all)
  --log-dir DIR      local log directory (default: <repo>/logs) [RLM_LOG_DIR]

EOF
  rlm_common_help
}

rlm_script_option() {
  case "$1" in
    --job) rlm_need_value "$@"; JOB="$2" ;;
    --env) rlm_need_value "$@"; ENVS+=("$2") ;;
    --detach) DETACH=1; RLM_CONSUMED=1 ;;
    --no-distributed) DISTRIBUTED=0; RLM_CONSUMED=1 ;;
    --no-remote-log) REMOTE_LOG=0; RLM_CONSUMED=1 ;;
    --worker) rlm_need_value "$@"; WORKER="$2" ;;
    --log-dir) rlm_need_value "$@"; LOG_DIR="$2" ;;
    *) return 1 ;;
  esac
}

rlm_parse_args "$@"
rlm_require TPU_NAME TPU_ZONE TPU_PROJECT
rlm_check_worker "$WORKER"
((${#RLM_CMD[@]} > 0)) || rlm_die "no command given; usage: run.sh [options] -- CMD [ARGS...]"
JOB="${JOB:-$TPU_NAME}"
[[ "$JOB" =~ ^[A-Za-z0-9._-]+$ ]] || rlm_die "--job may only use letters, digits, '.', '_' and '-' (got '$JOB')"

ts="$(rlm_timestamp)"
log_name="$JOB-$ts.log"
local_log="$LOG_DIR/$log_name"
rlog_dir="$RLM_REMOTE_LOG_DIR"
rlog="$rlog_dir/$log_name"
cmd_q="$(rlm_quote_cmd "${RLM_CMD[@]}")"

script="set -eo pipefail; cd $RLM_REMOTE_DIR; source $RLM_REMOTE_VENV/bin/activate;"
if [[ "$DISTRIBUTED" == 1 ]]; then
  script+=" export RLM_DISTRIBUTED=1;"
fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || rlm_die "--env expects KEY=VALUE (got '$kv')"
  script+=" export $(rlm_quote_word "$kv");"
done
if [[ "$DETACH" == 1 && "$REMOTE_LOG" != 1 ]]; then
  rlm_die "--detach needs the remote log; drop --no-remote-log"
fi
if [[ "$REMOTE_LOG" == 1 ]]; then
  script+=" mkdir -p $rlog_dir; ln -sfn $log_name $rlog_dir/latest.log;"
fi
if [[ "$DETACH" == 1 ]]; then
  script+=" nohup bash -c $(rlm_quote_word "$cmd_q") > $rlog 2>&1 < /dev/null &"
  # shellcheck disable=SC2016  # $! and $(hostname) are expanded on the worker
  script+=' echo "started pid $! on $(hostname);'
  script+=" log: $rlog\""
elif [[ "$REMOTE_LOG" == 1 ]]; then
  script+=" $cmd_q 2>&1 | tee $rlog"
else
  script+=" $cmd_q"
fi

rlm_info "running on $TPU_NAME (worker $WORKER): $cmd_q"
rlm_info "local log: $local_log"
rlm_run mkdir -p "$LOG_DIR"
rlm_ssh_argv "$WORKER" "$script"
rlm_run_tee "$local_log" "${RLM_ARGV[@]}"
