#!/usr/bin/env bash
# Copy the repository (files listed by git ls-files) to every TPU worker.
set -euo pipefail

RLM_PROG="sync.sh"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TRACKED_ONLY=0
CLEAN=0
WORKER=all
TAR="${TAR:-tar}"

rlm_usage() {
  cat <<'EOF'
Usage: tpu_scripts/sync.sh [options]

Copy this repository to ~/recursive_lm on every worker (--worker=all):
  1. git ls-files (tracked + untracked-but-not-ignored) | tar -> local tarball
  2. gcloud compute tpus tpu-vm scp TARBALL NAME:rlm-sync.tgz --worker=all
  3. gcloud compute tpus tpu-vm ssh NAME --worker=all --command='tar -x ...'
Top-level logs/ and .venv/, __pycache__/ and *.pyc are never copied. Files
that git lists but that were deleted locally are skipped.

Required: TPU_NAME, TPU_ZONE, TPU_PROJECT.

Script options:
  --tracked-only     copy only files tracked by git (plain `git ls-files`)
  --clean            delete the remote copy first (removes stale files; the
                     venv and remote logs live outside it and are kept)
  --worker W         a single worker index instead of all (default: all)
Environment: TAR (GNU tar; on macOS use TAR=gtar), RLM_REMOTE_DIR.

EOF
  rlm_common_help
}

rlm_script_option() {
  case "$1" in
    --tracked-only) TRACKED_ONLY=1; RLM_CONSUMED=1 ;;
    --clean) CLEAN=1; RLM_CONSUMED=1 ;;
    --worker) rlm_need_value "$@"; WORKER="$2" ;;
    *) return 1 ;;
  esac
}

rlm_parse_args "$@"
rlm_require TPU_NAME TPU_ZONE TPU_PROJECT
rlm_check_worker "$WORKER"
((${#RLM_CMD[@]} == 0)) || rlm_die "sync.sh takes no command"
# shellcheck disable=SC2088  # literal remote paths, compared as text
case "$RLM_REMOTE_DIR" in
  "" | "~" | "~/" | "/" | *" "*) rlm_die "RLM_REMOTE_DIR '$RLM_REMOTE_DIR' is not a usable directory" ;;
esac

if [[ "$RLM_DRY_RUN" != 1 ]] && ! git -C "$RLM_REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  rlm_fail "$RLM_REPO_ROOT is not a git repository"
fi

ls_files=(git -C "$RLM_REPO_ROOT" ls-files -z --cached)
if [[ "$TRACKED_ONLY" != 1 ]]; then
  ls_files+=(--others --exclude-standard)
fi
tarball="${TMPDIR:-/tmp}/rlm-sync-${TPU_NAME}-$$.tgz"
remote_tarball="rlm-sync-$$.tgz"
tar_args=("$TAR" -C "$RLM_REPO_ROOT" --null --ignore-failed-read
  --anchored --exclude=logs --exclude=.venv
  --no-anchored --exclude=__pycache__ '--exclude=*.pyc'
  -T - -czf "$tarball")

if [[ "$RLM_DRY_RUN" != 1 ]]; then
  trap 'rm -f "$tarball"' EXIT
fi

rlm_info "packing $RLM_REPO_ROOT -> $TPU_NAME:$RLM_REMOTE_DIR (worker $WORKER)"
rlm_run_shell "$(rlm_quote_cmd "${ls_files[@]}") | $(rlm_quote_cmd "${tar_args[@]}")"

rlm_loc_flags
rlm_ssh_extra
rlm_run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_tarball" \
  "${RLM_LOC[@]}" "--worker=$WORKER" ${RLM_SSH_EXTRA[@]+"${RLM_SSH_EXTRA[@]}"}

unpack="set -e;"
if [[ "$CLEAN" == 1 ]]; then
  unpack+=" rm -rf $RLM_REMOTE_DIR;"
fi
unpack+=" mkdir -p $RLM_REMOTE_DIR && tar -xzf ~/$remote_tarball -C $RLM_REMOTE_DIR && rm -f ~/$remote_tarball"
rlm_ssh "$WORKER" "$unpack"

rlm_run rm -f "$tarball"
