#!/usr/bin/env bash
# Install the Python environment on every TPU worker.
set -euo pipefail

RLM_PROG="setup.sh"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=all
DO_SYNC=1
VERIFY=1
USE_UV=1
PYTHON_BIN=""
PYTHON_VERSION="${RLM_PYTHON_VERSION:-3.11}"
JAX_VERSION="${RLM_JAX_VERSION:-$RLM_JAX_VERSION_DEFAULT}"
FIND_LINKS="${RLM_JAX_FIND_LINKS:-}"

rlm_usage() {
  cat <<'EOF'
Usage: tpu_scripts/setup.sh [options]

On every worker (--worker=all): create a Python venv at ~/rlm-venv and
install the synced repo plus the TPU build of JAX, pinned:

  pip install -e '.[dev,tpu]' 'jax[tpu]==0.10.2'

(the repo's tpu extra is jax[tpu] at the pinned version, which pulls the
matching jaxlib and libtpu wheels from PyPI; the explicit pin keeps
--jax-version visible on the command line).
JAX 0.10.2 needs Python >= 3.11 while the TPU base images ship 3.10, so by
default the venv is made with uv (`uv venv --python 3.11`, uv fetches the
interpreter); --python BIN uses `BIN -m venv` + pip instead.

The repo is synced first (tpu_scripts/sync.sh) unless --no-sync. Finally
every worker prints jax.device_count() as a smoke test (all workers must
take part on a pod slice, which --worker=all does).

Required: TPU_NAME, TPU_ZONE, TPU_PROJECT.

Script options:
  --no-sync              do not run sync.sh first
  --no-verify            skip the jax.device_count() check
  --python BIN           make the venv with BIN -m venv (e.g. python3.11), no uv
  --python-version X.Y   interpreter uv uses (default 3.11) [RLM_PYTHON_VERSION]
  --jax-version V        pinned jax version (default 0.10.2) [RLM_JAX_VERSION]
  --find-links URL       extra pip -f index for libtpu (only old jax needs it)
                         [RLM_JAX_FIND_LINKS]
  --worker W             one worker index instead of all (default: all)

EOF
  rlm_common_help
}

rlm_script_option() {
  case "$1" in
    --no-sync) DO_SYNC=0; RLM_CONSUMED=1 ;;
    --no-verify) VERIFY=0; RLM_CONSUMED=1 ;;
    --python) rlm_need_value "$@"; PYTHON_BIN="$2"; USE_UV=0 ;;
    --python-version) rlm_need_value "$@"; PYTHON_VERSION="$2" ;;
    --jax-version) rlm_need_value "$@"; JAX_VERSION="$2" ;;
    --find-links) rlm_need_value "$@"; FIND_LINKS="$2" ;;
    --worker) rlm_need_value "$@"; WORKER="$2" ;;
    *) return 1 ;;
  esac
}

rlm_parse_args "$@"
rlm_require TPU_NAME TPU_ZONE TPU_PROJECT
rlm_check_worker "$WORKER"
((${#RLM_CMD[@]} == 0)) || rlm_die "setup.sh takes no command"
[[ "$JAX_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]] || rlm_die "bad --jax-version '$JAX_VERSION'"
[[ "$PYTHON_VERSION" =~ ^[0-9]+\.[0-9]+$ ]] || rlm_die "bad --python-version '$PYTHON_VERSION'"

if [[ "$DO_SYNC" == 1 ]]; then
  sync_args=(--worker "$WORKER")
  "$RLM_SCRIPTS_DIR/sync.sh" "${sync_args[@]}"
fi

venv="$RLM_REMOTE_VENV"
py="$venv/bin/python"
pkgs=(-e '.[dev,tpu]' "jax[tpu]==$JAX_VERSION")
if [[ -n "$FIND_LINKS" ]]; then
  pkgs+=(-f "$FIND_LINKS")
fi
pkgs_q="$(rlm_quote_cmd "${pkgs[@]}")"

# The remote script runs in the worker's login shell (bash). `~/` paths are
# left unquoted so that the worker expands them.
script="set -euo pipefail; cd $RLM_REMOTE_DIR;"
if [[ "$USE_UV" == 1 ]]; then
  # shellcheck disable=SC2016  # $HOME/$PATH are expanded on the worker
  script+=' export PATH="$HOME/.local/bin:$PATH";'
  script+=' if ! command -v uv >/dev/null 2>&1; then'
  script+=' python3 -m pip install --user --quiet --upgrade uv'
  script+=' || python3 -m pip install --user --quiet --upgrade --break-system-packages uv; fi;'
  script+=" uv venv --allow-existing --python $PYTHON_VERSION $venv;"
  script+=" uv pip install --python $py $pkgs_q;"
else
  script+=" $(rlm_quote_word "$PYTHON_BIN") -m venv $venv;"
  script+=" $py -m pip install --quiet --upgrade pip;"
  script+=" $py -m pip install $pkgs_q;"
fi
if [[ "$VERIFY" == 1 ]]; then
  script+=" $py -c 'import jax; print(\"jax\", jax.__version__, \"devices\", jax.device_count(), \"local\", jax.local_device_count(), \"process\", jax.process_index())'"
fi

rlm_info "installing jax[tpu]==$JAX_VERSION and the repo on $TPU_NAME (worker $WORKER)"
rlm_ssh "$WORKER" "$script"
