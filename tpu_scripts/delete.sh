#!/usr/bin/env bash
# Delete the TPU VM / pod slice (or its queued resource).
set -euo pipefail

RLM_PROG="delete.sh"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

YES=0
ASYNC=0

rlm_usage() {
  cat <<'EOF'
Usage: tpu_scripts/delete.sh [options]

Delete the TPU VM or pod slice:
  gcloud compute tpus tpu-vm delete NAME --zone=.. --project=.. [--quiet]
With --queued (TPU_QUEUED=1) the queued resource NAME and its node are
deleted instead (queued-resources delete --force).
Without --yes gcloud asks for confirmation; with --yes nothing is asked.

Required: TPU_NAME, TPU_ZONE, TPU_PROJECT.

Script options:
  -y, --yes     do not ask (passes --quiet to gcloud)
  --async       return without waiting for the deletion to finish

EOF
  rlm_common_help
}

rlm_script_option() {
  case "$1" in
    -y | --yes) YES=1; RLM_CONSUMED=1 ;;
    --async) ASYNC=1; RLM_CONSUMED=1 ;;
    *) return 1 ;;
  esac
}

rlm_parse_args "$@"
rlm_require TPU_NAME TPU_ZONE TPU_PROJECT
((${#RLM_CMD[@]} == 0)) || rlm_die "delete.sh takes no command"

rlm_loc_flags
extra=()
if [[ "$ASYNC" == 1 ]]; then extra+=(--async); fi
if [[ "$YES" == 1 ]]; then extra+=(--quiet); fi

if [[ "$TPU_QUEUED" == 1 ]]; then
  rlm_run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${RLM_LOC[@]}" \
    --force ${extra[@]+"${extra[@]}"}
else
  rlm_run "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${RLM_LOC[@]}" \
    ${extra[@]+"${extra[@]}"}
fi
