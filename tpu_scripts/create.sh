#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice and wait until it is READY.
set -euo pipefail

RLM_PROG="create.sh"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PREEMPTIBLE=0
NO_WAIT=0

rlm_usage() {
  cat <<'EOF'
Usage: tpu_scripts/create.sh [options] [-- EXTRA_GCLOUD_CREATE_FLAGS...]

Create a TPU VM (single host, e.g. v5litepod-8) or a pod slice (multi-host,
e.g. v4-32) and wait until it is READY (polls `describe`; skipped with
--dry-run or --no-wait).

  gcloud compute tpus tpu-vm create NAME --zone=.. --project=..
      --accelerator-type=TYPE --version=RUNTIME [--spot | --preemptible]

With --queued (TPU_QUEUED=1) a queued resource named NAME with node NAME is
requested instead (better obtainability for large slices); the script waits
for it to become ACTIVE, then for the node to be READY.

Required: TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE. TPU_RUNTIME defaults by
type: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
v5litepod/v5e -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base.

Script options:
  --preemptible      legacy preemptible TPU (prefer --spot; not with --queued)
  --no-wait          return right after the create request
Words after `--` are appended to the gcloud create command
(e.g. -- --network=my-net --reserved). Wait tuning: RLM_WAIT_TIMEOUT
(seconds, default 3600), RLM_POLL_INTERVAL (default 15).

EOF
  rlm_common_help
}

rlm_script_option() {
  case "$1" in
    --preemptible) PREEMPTIBLE=1; RLM_CONSUMED=1 ;;
    --no-wait) NO_WAIT=1; RLM_CONSUMED=1 ;;
    *) return 1 ;;
  esac
}

rlm_parse_args "$@"
rlm_require TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE
rlm_resolve_runtime
PREEMPTIBLE="$(rlm_bool TPU_PREEMPTIBLE "${TPU_PREEMPTIBLE:-$PREEMPTIBLE}")"
if [[ "$TPU_SPOT" == 1 && "$PREEMPTIBLE" == 1 ]]; then
  rlm_die "choose one of --spot (TPU_SPOT=1) and --preemptible"
fi
if [[ "$TPU_QUEUED" == 1 && "$PREEMPTIBLE" == 1 ]]; then
  rlm_die "--preemptible is not available with --queued; use --spot"
fi

rlm_loc_flags
capacity=()
if [[ "$TPU_SPOT" == 1 ]]; then capacity=(--spot); fi
if [[ "$PREEMPTIBLE" == 1 ]]; then capacity=(--preemptible); fi

rlm_info "creating $TPU_TYPE '$TPU_NAME' in $TPU_PROJECT/$TPU_ZONE (runtime $TPU_RUNTIME, spot=$TPU_SPOT, queued=$TPU_QUEUED)"

if [[ "$TPU_QUEUED" == 1 ]]; then
  rlm_run "$GCLOUD" compute tpus queued-resources create "$TPU_NAME" \
    "--node-id=$TPU_NAME" "${RLM_LOC[@]}" \
    "--accelerator-type=$TPU_TYPE" "--runtime-version=$TPU_RUNTIME" \
    ${capacity[@]+"${capacity[@]}"} ${RLM_CMD[@]+"${RLM_CMD[@]}"}
else
  rlm_run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${RLM_LOC[@]}" \
    "--accelerator-type=$TPU_TYPE" "--version=$TPU_RUNTIME" \
    ${capacity[@]+"${capacity[@]}"} ${RLM_CMD[@]+"${RLM_CMD[@]}"}
fi

if [[ "$NO_WAIT" == 1 ]]; then
  rlm_info "not waiting (--no-wait)"
  exit 0
fi

if [[ "$TPU_QUEUED" == 1 ]]; then
  rlm_wait_for_state "queued resource $TPU_NAME" ACTIVE 'FAILED|SUSPENDED|SUSPENDING|DELETING' \
    "$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${RLM_LOC[@]}" \
    '--format=value(state.state)'
fi
rlm_wait_for_state "TPU $TPU_NAME" READY 'PREEMPTED|TERMINATED|STOPPED|STOPPING|DELETING|FAILED' \
  "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${RLM_LOC[@]}" '--format=value(state)'

if [[ "$RLM_DRY_RUN" != 1 ]]; then
  rlm_info "READY. Next: tpu_scripts/setup.sh (syncs the repo and installs jax[tpu]==$RLM_JAX_VERSION_DEFAULT)"
fi
