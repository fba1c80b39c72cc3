"""Tests for the TPU launch scripts in tpu_scripts/.

Every script is run through bash with --dry-run and the printed commands are
checked. No real gcloud is needed: dry-run never executes it, and the few
tests that exercise the non-dry-run paths put a fake `gcloud` on PATH that
runs the ssh --command locally against a temporary HOME.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
ALL_SCRIPTS = ["create", "setup", "sync", "run", "logs", "delete"]
JAX_VERSION = "0.10.2"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

BASE_ENV = {
    "TPU_NAME": "my-tpu",
    "TPU_ZONE": "us-west4-a",
    "TPU_PROJECT": "my-proj",
    "TPU_TYPE": "v5litepod-8",
}


def _clean_env(tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("TPU_") or k.startswith("RLM_") or k.startswith("JAX_") or k == "GCLOUD")
    }
    env["HOME"] = str(tmp_path / "home")
    env["TMPDIR"] = str(tmp_path)
    env["RLM_LOG_DIR"] = str(tmp_path / "local-logs")
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(BASE_ENV)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_script(name, *args, env, cwd=REPO, script_dir=SCRIPTS, timeout=60):
    return subprocess.run(
        ["bash", str(script_dir / f"{name}.sh"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry(name, *args, env):
    """Run NAME --dry-run, assert success, return the printed commands as argv lists."""
    res = run_script(name, "--dry-run", *args, env=env)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert lines, f"{name}.sh printed no commands"
    return [shlex.split(ln) for ln in lines], lines


def gcloud_cmds(cmds, *sub):
    """Commands that start with `gcloud <sub...>`."""
    n = len(sub)
    return [c for c in cmds if c[0] == "gcloud" and tuple(c[1 : 1 + n]) == sub]


def remote_script(cmd) -> str:
    scripts = [a[len("--command=") :] for a in cmd if a.startswith("--command=")]
    assert len(scripts) == 1, cmd
    return scripts[0]


def assert_bash_syntax(script: str) -> None:
    res = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, f"remote script is not valid bash: {res.stderr}\n{script}"


def assert_location(cmd, name="my-tpu"):
    assert name in cmd
    assert "--zone=us-west4-a" in cmd
    assert "--project=my-proj" in cmd


@pytest.fixture
def env(tmp_path):
    return _clean_env(tmp_path)


# --------------------------------------------------------------------- help ---


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help_exits_zero(name, tmp_path):
    # --help works without any settings.
    e = _clean_env(tmp_path, TPU_NAME=None, TPU_ZONE=None, TPU_PROJECT=None, TPU_TYPE=None)
    res = run_script(name, "--help", env=e)
    assert res.returncode == 0, res.stderr
    assert "Usage: tpu_scripts/" in res.stdout
    assert "--dry-run" in res.stdout
    assert "TPU_NAME" in res.stdout


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_scripts_are_executable_and_strict(name):
    path = SCRIPTS / f"{name}.sh"
    assert path.stat().st_mode & stat.S_IXUSR
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("name", [*ALL_SCRIPTS, "common"])
def test_bash_syntax(name):
    res = subprocess.run(["bash", "-n", str(SCRIPTS / f"{name}.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    files = [str(SCRIPTS / f"{n}.sh") for n in [*ALL_SCRIPTS, "common"]]
    res = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------- required settings ---


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_missing_tpu_name_exits_2(name, tmp_path):
    e = _clean_env(tmp_path, TPU_NAME=None)
    args = ["--dry-run"] + (["--", "echo", "hi"] if name == "run" else [])
    res = run_script(name, *args, env=e)
    assert res.returncode == 2
    assert res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert "TPU_NAME" in err[0] and "--name" in err[0]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_missing_zone_and_project_named(name, tmp_path):
    e = _clean_env(tmp_path, TPU_ZONE=None, TPU_PROJECT=None)
    args = ["--dry-run"] + (["--", "echo", "hi"] if name == "run" else [])
    res = run_script(name, *args, env=e)
    assert res.returncode == 2
    assert "TPU_ZONE" in res.stderr and "TPU_PROJECT" in res.stderr
    assert "TPU_NAME" not in res.stderr


def test_flag_satisfies_missing_env(tmp_path):
    e = _clean_env(tmp_path, TPU_NAME=None)
    cmds, _ = dry("delete", "--name", "from-flag", env=e)
    assert gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "delete")[0][5] == "from-flag"


def test_create_requires_type(tmp_path):
    e = _clean_env(tmp_path, TPU_TYPE=None)
    res = run_script("create", "--dry-run", env=e)
    assert res.returncode == 2
    assert "TPU_TYPE" in res.stderr


def test_unknown_type_needs_runtime(tmp_path):
    e = _clean_env(tmp_path, TPU_TYPE="v99-8")
    res = run_script("create", "--dry-run", env=e)
    assert res.returncode == 2
    assert "TPU_RUNTIME" in res.stderr
    cmds, _ = dry("create", "--runtime", "my-image", env=e)
    assert "--version=my-image" in cmds[0]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_unknown_option_exits_2(name, env):
    res = run_script(name, "--dry-run", "--bogus", env=env)
    assert res.returncode == 2
    assert "--bogus" in res.stderr


def test_bad_spot_value(tmp_path):
    res = run_script("create", "--dry-run", env=_clean_env(tmp_path, TPU_SPOT="maybe"))
    assert res.returncode == 2
    assert "TPU_SPOT" in res.stderr


# ------------------------------------------------------------------ create ---


def test_create_dry_run(env):
    res = run_script("create", "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1  # no describe loop in dry-run
    cmd = shlex.split(lines[0])
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert_location(cmd)
    assert "--accelerator-type=v5litepod-8" in cmd
    assert "--version=v2-alpha-tpuv5-lite" in cmd
    assert "--spot" not in cmd and "--preemptible" not in cmd
    assert "READY" in res.stderr  # says it skipped the wait


@pytest.mark.parametrize(
    "tpu_type, runtime",
    [
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_runtime_default_by_type(tpu_type, runtime, tmp_path):
    cmds, _ = dry("create", env=_clean_env(tmp_path, TPU_TYPE=tpu_type))
    assert f"--accelerator-type={tpu_type}" in cmds[0]
    assert f"--version={runtime}" in cmds[0]


def test_create_env_runtime_and_spot(tmp_path):
    e = _clean_env(tmp_path, TPU_TYPE="v4-32", TPU_RUNTIME="tpu-ubuntu2204-base", TPU_SPOT="1")
    cmds, _ = dry("create", env=e)
    assert "--spot" in cmds[0]
    assert "--accelerator-type=v4-32" in cmds[0]
    assert "--version=tpu-ubuntu2204-base" in cmds[0]


def test_create_flags_override_env(env):
    cmds, _ = dry(
        "create", "--name", "other", "--zone=europe-west4-b", "--project", "p2",
        "--type", "v4-8", "--runtime", "rt", "--spot", "--", "--network=my-net",
        env=env,
    )
    cmd = cmds[0]
    assert cmd[5] == "other"
    assert "--zone=europe-west4-b" in cmd and "--project=p2" in cmd
    assert "--accelerator-type=v4-8" in cmd and "--version=rt" in cmd
    assert "--spot" in cmd and cmd[-1] == "--network=my-net"
    assert "my-tpu" not in cmd and "--zone=us-west4-a" not in cmd


def test_create_no_spot_flag_beats_env(tmp_path):
    cmds, _ = dry("create", "--no-spot", env=_clean_env(tmp_path, TPU_SPOT="1"))
    assert "--spot" not in cmds[0]


def test_create_preemptible(env):
    cmds, _ = dry("create", "--preemptible", env=env)
    assert "--preemptible" in cmds[0]
    res = run_script("create", "--dry-run", "--preemptible", "--spot", env=env)
    assert res.returncode == 2


def test_create_queued(env):
    cmds, _ = dry("create", "--queued", "--spot", env=env)
    assert len(cmds) == 1
    cmd = cmds[0]
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    assert "--node-id=my-tpu" in cmd
    assert_location(cmd)
    assert "--accelerator-type=v5litepod-8" in cmd
    assert "--runtime-version=v2-alpha-tpuv5-lite" in cmd
    assert "--spot" in cmd


# ------------------------------------------------------------------- setup ---


def test_setup_dry_run(env):
    cmds, lines = dry("setup", env=env)
    # sync first, then the install on every worker
    assert gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "scp")
    ssh = gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "ssh")
    assert len(ssh) == 2
    install = ssh[-1]
    assert_location(install)
    assert "--worker=all" in install
    script = remote_script(install)
    assert_bash_syntax(script)
    assert f"'jax[tpu]=={JAX_VERSION}'" in script
    assert "-e '.[dev,tpu]'" in script  # the repo's tpu extra
    assert "pip install" in script
    assert "cd ~/recursive_lm" in script
    assert "venv" in script and "--python 3.11" in script
    assert "jax.device_count()" in script
    # the pinned version also shows on the printed line itself
    assert f"jax[tpu]=={JAX_VERSION}" in lines[-1]


def test_setup_options(env):
    cmds, _ = dry("setup", "--no-sync", "--no-verify", "--python", "python3.11", env=env)
    assert len(cmds) == 1
    script = remote_script(cmds[0])
    assert_bash_syntax(script)
    assert "python3.11 -m venv ~/rlm-venv" in script
    assert f"~/rlm-venv/bin/python -m pip install -e '.[dev,tpu]' 'jax[tpu]=={JAX_VERSION}'" in script
    assert "device_count" not in script
    assert "uv " not in script

    cmds, _ = dry("setup", "--no-sync", "--jax-version", "0.10.1", "--find-links", "https://x/y.html", env=env)
    script = remote_script(cmds[0])
    assert "'jax[tpu]==0.10.1'" in script and "-f https://x/y.html" in script
    assert run_script("setup", "--dry-run", "--jax-version", "latest; rm -rf /", env=env).returncode == 2


# -------------------------------------------------------------------- sync ---


def test_sync_dry_run(env):
    cmds, lines = dry("sync", env=env)
    assert "git" in lines[0] and "ls-files" in lines[0] and "| tar" in lines[0]
    scp = gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "scp")
    assert len(scp) == 1
    assert_location(scp[0], name=scp[0][5])
    assert scp[0][6].startswith("my-tpu:")
    assert "--worker=all" in scp[0]
    ssh = gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "ssh")
    assert len(ssh) == 1
    assert_location(ssh[0])
    assert "--worker=all" in ssh[0]
    script = remote_script(ssh[0])
    assert_bash_syntax(script)
    assert "~/recursive_lm" in script and "tar -xzf" in script
    assert "rm -rf" not in script
    # the local tarball is the one that is copied, and it is removed at the end
    assert cmds[-1][:2] == ["rm", "-f"] and cmds[-1][2] == scp[0][5]


def test_sync_clean_and_tracked_only(env):
    cmds, lines = dry("sync", "--clean", "--tracked-only", env=env)
    assert "--others" not in lines[0]
    script = remote_script(gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "ssh")[0])
    assert "rm -rf ~/recursive_lm;" in script


# --------------------------------------------------------------------- run ---

TRAIN = ["python", "-m", "recursive_lm.train", "--config", "configs/default.py", "--workdir", "gs://bucket/run1"]


def test_run_dry_run(env, tmp_path):
    res = run_script("run", "--dry-run", "--", *TRAIN, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert shlex.split(lines[0]) == ["mkdir", "-p", str(tmp_path / "local-logs")]
    line = lines[1]
    # gcloud ... 2>&1 | tee -a logs/<name>-<timestamp>.log
    m = re.fullmatch(r"(.*) 2>&1 \| tee -a (\S+)", line)
    assert m, line
    log = Path(shlex.split(m.group(2))[0])
    assert log.parent == tmp_path / "local-logs"
    assert re.fullmatch(r"my-tpu-\d{8}-\d{6}\.log", log.name)
    cmd = shlex.split(m.group(1))
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert_location(cmd)
    assert "--worker=all" in cmd
    script = remote_script(cmd)
    assert_bash_syntax(script)
    assert "export RLM_DISTRIBUTED=1;" in script
    assert "cd ~/recursive_lm" in script and "source ~/rlm-venv/bin/activate" in script
    assert " ".join(TRAIN) in script
    assert f"tee ~/rlm-logs/{log.name}" in script
    assert not (tmp_path / "local-logs").exists()  # dry-run creates nothing


def test_run_default_log_dir_is_repo_logs(tmp_path):
    e = _clean_env(tmp_path, RLM_LOG_DIR=None)
    _, lines = dry("run", "--", "echo", "hi", env=e)
    assert f"| tee -a {REPO}/logs/my-tpu-" in lines[-1]


def test_run_options(env):
    cmds, lines = dry(
        "run", "--job", "exp1", "--env", "FOO=a b", "--env=XLA_FLAGS=--xla_dump_to=/tmp/d",
        "--", "python", "-c", "print('it''s')", env=env,
    )
    assert re.search(r"exp1-\d{8}-\d{6}\.log$", lines[-1])
    script = remote_script(gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "ssh")[0])
    assert_bash_syntax(script)
    assert "export 'FOO=a b';" in script
    assert "export XLA_FLAGS=--xla_dump_to=/tmp/d;" in script
    # the command words survive two levels of quoting
    cmd_part = script.split("latest.log;", 1)[1].rsplit(" 2>&1 | tee ", 1)[0]
    assert shlex.split(cmd_part) == ["python", "-c", "print('it''s')"]


def test_run_detach_and_no_distributed(env):
    cmds, _ = dry("run", "--detach", "--no-distributed", "--", *TRAIN, env=env)
    script = remote_script(gcloud_cmds(cmds, "compute", "tpus", "tpu-vm", "ssh")[0])
    assert_bash_syntax(script)
    assert "nohup bash -c" in script and "< /dev/null &" in script
    assert "RLM_DISTRIBUTED" not in script
    assert "--worker=all" in cmds[-1]


def test_run_without_command_exits_2(env):
    res = run_script("run", "--dry-run", env=env)
    assert res.returncode == 2
    assert "no command" in res.stderr


def test_run_command_without_double_dash(env):
    cmds, _ = dry("run", "echo", "hello", env=env)
    assert "echo hello 2>&1 | tee" in remote_script(cmds[-1])


# -------------------------------------------------------------- logs/delete ---


def test_logs_dry_run(env):
    cmds, _ = dry("logs", env=env)
    assert len(cmds) == 1
    cmd = cmds[0]
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert_location(cmd)
    assert "--worker=0" in cmd
    script = remote_script(cmd)
    assert_bash_syntax(script)
    assert "tail -n 100 -F" in script and "~/rlm-logs/latest.log" in script


def test_logs_all_workers_job(env):
    cmds, _ = dry("logs", "--all", "--job", "exp1", "--lines", "5", "--no-follow", env=env)
    assert "--worker=all" in cmds[0]
    script = remote_script(cmds[0])
    assert_bash_syntax(script)
    assert "~/rlm-logs/exp1-*.log" in script and "tail -n 5 " in script and "-F" not in script
    assert run_script("logs", "--dry-run", "--worker", "x", env=env).returncode == 2


def test_delete_dry_run(env):
    cmds, _ = dry("delete", env=env)
    assert len(cmds) == 1
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert_location(cmds[0])
    assert "--quiet" not in cmds[0]
    cmds, _ = dry("delete", "--yes", env=env)
    assert "--quiet" in cmds[0]


def test_delete_queued(env):
    cmds, _ = dry("delete", "--queued", "-y", env=env)
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in cmds[0] and "--quiet" in cmds[0]
    assert_location(cmds[0])


def test_ssh_extra_flags(tmp_path):
    e = _clean_env(tmp_path, TPU_SSH_FLAGS="--internal-ip --strict-host-key-checking=no")
    cmds, _ = dry("sync", env=e)
    for c in gcloud_cmds(cmds, "compute", "tpus", "tpu-vm"):
        assert "--internal-ip" in c and "--strict-host-key-checking=no" in c


def test_rlm_dry_run_env(tmp_path):
    res = run_script("delete", env=_clean_env(tmp_path, RLM_DRY_RUN="1"))
    assert res.returncode == 0
    assert res.stdout.startswith("gcloud compute tpus tpu-vm delete my-tpu")


# ---------------------------------------------- fake gcloud (non-dry-run) ---

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Test double for gcloud: records calls, answers describe from a state list,
# runs `tpu-vm ssh --command` locally in $HOME and copies `tpu-vm scp` files.
printf '%s\n' "$*" >> "$FAKE_GCLOUD_LOG"
case "$3 $4" in
  "tpu-vm describe" | "queued-resources describe")
    n=$(cat "$FAKE_STATES.n" 2>/dev/null || echo 0)
    total=$(wc -l < "$FAKE_STATES")
    n=$((n + 1)); if [ "$n" -gt "$total" ]; then n=$total; fi
    echo "$n" > "$FAKE_STATES.n"
    sed -n "${n}p" "$FAKE_STATES"
    ;;
  "tpu-vm ssh")
    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
    cd "$HOME" && exec bash -c "$cmd"
    ;;
  "tpu-vm scp")
    cp "$5" "$HOME/${6#*:}"
    ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    g = bindir / "gcloud"
    g.write_text(FAKE_GCLOUD)
    g.chmod(0o755)
    e = _clean_env(tmp_path)
    e["PATH"] = f"{bindir}{os.pathsep}{e['PATH']}"
    e["FAKE_GCLOUD_LOG"] = str(tmp_path / "gcloud.log")
    e["FAKE_STATES"] = str(tmp_path / "states")
    e["RLM_POLL_INTERVAL"] = "0"
    (tmp_path / "states").write_text("READY\n")
    return e


def _calls(e) -> list[str]:
    p = Path(e["FAKE_GCLOUD_LOG"])
    return p.read_text().splitlines() if p.exists() else []


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_dry_run_never_calls_gcloud(name, fake):
    args = ["--", "echo", "hi"] if name == "run" else []
    res = run_script(name, "--dry-run", *args, env=fake)
    assert res.returncode == 0, res.stderr
    assert _calls(fake) == []


def test_create_waits_until_ready(fake, tmp_path):
    (tmp_path / "states").write_text("\nCREATING\nCREATING\nREADY\n")
    res = run_script("create", env=fake)
    assert res.returncode == 0, res.stderr
    calls = _calls(fake)
    assert calls[0].startswith("compute tpus tpu-vm create my-tpu")
    describes = [c for c in calls if " describe " in c]
    assert len(describes) == 4
    assert all("--format=value(state)" in c for c in describes)
    assert "READY" in res.stderr


def test_create_queued_waits_active_then_ready(fake, tmp_path):
    (tmp_path / "states").write_text("WAITING_FOR_RESOURCES\nACTIVE\nREADY\n")
    res = run_script("create", "--queued", env=fake)
    assert res.returncode == 0, res.stderr
    calls = _calls(fake)
    assert calls[0].startswith("compute tpus queued-resources create my-tpu")
    assert sum("queued-resources describe" in c for c in calls) == 2
    assert sum("tpu-vm describe" in c for c in calls) == 1


def test_create_fails_when_preempted(fake, tmp_path):
    (tmp_path / "states").write_text("CREATING\nPREEMPTED\n")
    res = run_script("create", env=fake)
    assert res.returncode == 1
    assert "PREEMPTED" in res.stderr


def test_create_wait_timeout(fake, tmp_path):
    (tmp_path / "states").write_text("CREATING\n")
    fake["RLM_WAIT_TIMEOUT"] = "0"
    res = run_script("create", env=fake)
    assert res.returncode == 1
    assert "timed out" in res.stderr


def _make_repo(tmp_path: Path) -> Path:
    """A throwaway git repo holding a copy of tpu_scripts/."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "tpu_scripts")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / "pkg" / "ignored.bin").write_text("junk\n")
    (repo / ".gitignore").write_text("*.bin\n")
    (repo / "logs").mkdir()
    (repo / "logs" / "old.log").write_text("log\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", ".gitignore", "pkg/mod.py"], check=True)
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_sync_end_to_end(fake, tmp_path):
    repo = _make_repo(tmp_path)
    res = run_script("sync", env=fake, script_dir=repo / "tpu_scripts")
    assert res.returncode == 0, res.stderr
    dest = Path(fake["HOME"]) / "recursive_lm"
    assert (dest / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert (dest / "tpu_scripts" / "run.sh").exists()  # untracked but not ignored
    assert not (dest / "pkg" / "ignored.bin").exists()
    assert not (dest / "logs").exists()
    assert not list(Path(fake["HOME"]).glob("rlm-sync-*.tgz"))  # remote tarball removed
    assert not list(tmp_path.glob("rlm-sync-*.tgz"))  # local tarball removed

    # --tracked-only --clean: only the git index, stale files removed
    (dest / "stale.txt").write_text("old")
    res = run_script("sync", "--tracked-only", "--clean", env=fake, script_dir=repo / "tpu_scripts")
    assert res.returncode == 0, res.stderr
    assert (dest / "pkg" / "mod.py").exists()
    assert not (dest / "stale.txt").exists()
    assert not (dest / "tpu_scripts").exists()


def _fake_worker(fake) -> Path:
    home = Path(fake["HOME"])
    (home / "recursive_lm").mkdir(exist_ok=True)
    (home / "rlm-venv" / "bin").mkdir(parents=True, exist_ok=True)
    (home / "rlm-venv" / "bin" / "activate").write_text("export RLM_VENV_ACTIVE=1\n")
    return home


def test_run_end_to_end(fake, tmp_path):
    home = _fake_worker(fake)
    script = 'echo "dist=$RLM_DISTRIBUTED venv=$RLM_VENV_ACTIVE foo=$FOO pwd=$(basename "$PWD")"; echo "arg=$1"'
    res = run_script(
        "run", "--job", "e2e", "--env", "FOO=x y", "--", "bash", "-c", script, "_", "it's a b", env=fake
    )
    assert res.returncode == 0, res.stderr
    expected = ["dist=1 venv=1 foo=x y pwd=recursive_lm", "arg=it's a b"]
    assert res.stdout.splitlines() == expected
    logs = list((tmp_path / "local-logs").glob("e2e-*.log"))
    assert len(logs) == 1
    assert logs[0].read_text().splitlines() == expected
    remote_logs = list((home / "rlm-logs").glob("e2e-*.log"))
    assert [p.name for p in remote_logs] == [logs[0].name]
    assert (home / "rlm-logs" / "latest.log").read_text().splitlines() == expected


def test_run_propagates_failure(fake):
    _fake_worker(fake)
    res = run_script("run", "--", "bash", "-c", "echo before; exit 3", env=fake)
    assert res.returncode == 3
    assert "before" in res.stdout


def test_run_detach_then_logs(fake):
    home = _fake_worker(fake)
    res = run_script("run", "--detach", "--job", "bg", "--", "echo", "detached-output", env=fake)
    assert res.returncode == 0, res.stderr
    assert "started pid" in res.stdout
    for _ in range(100):
        logs = list((home / "rlm-logs").glob("bg-*.log"))
        if logs and "detached-output" in logs[0].read_text():
            break
        subprocess.run(["sleep", "0.05"])
    res = run_script("logs", "--job", "bg", "--no-follow", env=fake)
    assert res.returncode == 0, res.stderr
    assert "detached-output" in res.stdout
