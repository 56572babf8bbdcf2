"""The pod's docker start command, run for real in bash under the image's entrypoint: unpack the
bundle, install only what an image lacks (torch frozen), serve."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jobs.training import POD_CONSTRAINTS, POD_ENV, POD_START_CMD, pod_bundle_b64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Our stand-in for the default image's ENTRYPOINT, with the behaviour unsloth's
# docker/entrypoint.sh documents: without UNSLOTH_SKIP_GPU_CHECK=1 it exits 1 when
# `nvidia-smi -L` lists no GPU (check 1), before running the command; otherwise it
# `exec "$@"`s the container command (RunPod's dockerArgs), here POD_START_CMD split into argv.
ENTRYPOINT = """#!/bin/bash
set -euo pipefail
if [[ "${UNSLOTH_SKIP_GPU_CHECK:-0}" != "1" ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo "ERROR: No GPU visible inside the container." >&2
        exit 1
    fi
fi
exec "$@"
"""

# python3 on the pod's PATH: the real interpreter, except that `python3 -m pip` only logs (and
# answers `freeze` from a file), and with MISSING_STACK=1 the stack check runs without
# site-packages, as on an image that lacks the training stack.
PYTHON3 = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "$@" >> "{log}"
    if [ "$3" = "freeze" ]; then cat "{freeze}"; fi
    exit 0
fi
if [ "$1" = "-c" ] && [ -n "$MISSING_STACK" ] && echo "$2" | grep -q find_spec; then
    exec "{python}" -S "$@"
fi
exec "{python}" "$@"
"""


def _pod_shell(tmp_path: Path, freeze: str = "") -> tuple[list[str], dict[str, str], int]:
    """argv (entrypoint + dockerArgs split as RunPod does) and env of a pod container."""
    argv = shlex.split(POD_START_CMD)
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3
    script = argv[2].replace("/opt/tuner", str(tmp_path / "opt")).replace(POD_CONSTRAINTS, str(tmp_path / "c.txt"))
    shims = tmp_path / "bin"
    shims.mkdir()
    (tmp_path / "freeze.txt").write_text(freeze)
    (shims / "python3").write_text(PYTHON3.format(log=tmp_path / "pip.log", freeze=tmp_path / "freeze.txt",
                                                  python=sys.executable))
    (shims / "pip").write_text(f'#!/bin/sh\necho "pip $@" >> {tmp_path}/pip.log\n')
    (shims / "unsloth-entrypoint").write_text(ENTRYPOINT)
    for f in shims.iterdir():
        f.chmod(0o755)
    port = _free_port()
    path = [str(shims)] + [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    env = {**os.environ, **POD_ENV, "PATH": os.pathsep.join(path), "TUNER_POD_TOKEN": "t0k",
           "TUNER_POD_PORT": str(port), "TUNER_WORKDIR": str(tmp_path / "work"),
           "TUNER_TRAIN_B64": pod_bundle_b64(), "PYTHONPATH": ""}
    return [str(shims / "unsloth-entrypoint"), "bash", "-c", script], env, port


def _serve(argv: list[str], env: dict[str, str], port: int, cwd: Path) -> str:
    """Run the container command until /health answers; returns its output."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "pod program never answered /health"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/progress", timeout=5).status_code == 401
        assert (cwd / "opt" / "jobs" / "train.py").is_file()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return proc.stdout.read().decode() if proc.stdout else ""


def test_pod_env_is_what_the_unsloth_image_needs() -> None:
    assert POD_ENV["UNSLOTH_SKIP_GPU_CHECK"] == "1"  # else its entrypoint exits before our server
    assert POD_ENV["UNSLOTH_SKIP_NOTEBOOK_SYNC"] == "1"
    assert POD_ENV["UNSLOTH_PREWARM_HUB_CACHE"] == "0"  # the variable unsloth/save.py reads
    assert "$" not in POD_START_CMD  # nothing for a shell on RunPod's side to expand


def test_entrypoint_without_pod_env_never_reaches_the_server(tmp_path: Path) -> None:
    """Why POD_ENV exists: on a pod whose GPU is not visible, the image's own check would end the
    container with exit 1, so the bot could never be told what is wrong."""
    argv, env, _ = _pod_shell(tmp_path)
    env.pop("UNSLOTH_SKIP_GPU_CHECK")
    out = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "No GPU visible" in out.stderr
    assert not (tmp_path / "opt").exists()


def test_start_command_on_the_unsloth_image_installs_nothing_and_serves(tmp_path: Path) -> None:
    argv, env, port = _pod_shell(tmp_path)
    out = _serve(argv, env, port, tmp_path)
    assert "training stack present, nothing to install" in out
    assert not (tmp_path / "pip.log").exists()  # no pip at all: the image has the stack


def test_start_command_on_another_image_installs_pinned_stack_with_torch_frozen(tmp_path: Path) -> None:
    freeze = "numpy==1.26.4\ntorch==2.6.0+cu124\ntorchvision==0.21.0+cu124\ntriton==3.2.0\n"
    argv, env, port = _pod_shell(tmp_path, freeze)
    _serve(argv, {**env, "MISSING_STACK": "1"}, port, tmp_path)
    calls = (tmp_path / "pip.log").read_text().splitlines()
    assert calls[0] == "-m pip freeze"
    install = calls[1].split()
    assert install[:5] == ["-m", "pip", "install", "-q", "-c"] and install[5] == str(tmp_path / "c.txt")
    assert (tmp_path / "c.txt").read_text().split() == ["torch==2.6.0+cu124", "torchvision==0.21.0+cu124"]
    pins = install[6:]
    assert pins and all("==" in p for p in pins)  # every package pinned
    assert {p.split("==")[0] for p in pins} >= {"pydantic", "transformers", "peft", "trl", "accelerate"}
    assert not any(p.startswith(("torch==", "unsloth")) for p in pins)  # never another torch
    assert len(calls) == 2


def test_start_command_installs_nothing_when_pip_does_not_manage_torch(tmp_path: Path) -> None:
    """A torch pip cannot pin (conda, a wheel URL): installing would pull a PyPI torch, so don't."""
    argv, env, port = _pod_shell(tmp_path, "torch @ file:///opt/conda/torch-2.4.0.whl\nnumpy==1.26.4\n")
    out = _serve(argv, {**env, "MISSING_STACK": "1"}, port, tmp_path)
    assert (tmp_path / "pip.log").read_text().splitlines() == ["-m pip freeze"]
    assert "no pip-managed torch in this image; installing nothing" in out


def test_idle_pod_removes_itself_when_the_bot_is_gone(tmp_path: Path) -> None:
    """Nobody polls a pod with no job / a finished job: it calls runpodctl on itself."""
    shims = tmp_path / "bin"
    shims.mkdir()
    runpodctl = shims / "runpodctl"
    runpodctl.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/runpodctl.log\n')
    runpodctl.chmod(0o755)
    port = _free_port()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "TUNER_POD_TOKEN": "t0k",
           "TUNER_POD_PORT": str(port), "TUNER_WORKDIR": str(tmp_path / "work"),
           "RUNPOD_POD_ID": "pod-abc", "TUNER_POD_IDLE_TIMEOUT_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train"], env=env,
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        polled_until = time.monotonic() + 5  # polling keeps it alive past the 3 s timeout
        while time.monotonic() < polled_until:
            try:
                httpx.get(f"http://127.0.0.1:{port}/progress", timeout=1,
                          headers={"Authorization": "Bearer t0k"})
            except httpx.HTTPError:
                pass  # still starting
            time.sleep(0.5)
        time.sleep(1.0)
        assert proc.poll() is None and not (tmp_path / "runpodctl.log").exists()
        assert proc.wait(timeout=30) == 3  # then the bot goes quiet: removed, exited
        assert (tmp_path / "runpodctl.log").read_text().split() == ["remove", "pod", "pod-abc"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
