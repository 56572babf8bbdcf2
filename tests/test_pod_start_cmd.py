"""The pod's docker start command, run for real in bash: unpack the bundle, install, serve."""

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

from jobs.training import POD_START_CMD, pod_bundle_b64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_start_command_unpacks_installs_and_serves(tmp_path: Path) -> None:
    argv = shlex.split(POD_START_CMD)
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3
    script = argv[2].replace("/opt/tuner", str(tmp_path / "opt"))
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "pip").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\n')
    (shims / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    port = _free_port()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "TUNER_POD_TOKEN": "t0k",
           "TUNER_POD_PORT": str(port), "TUNER_WORKDIR": str(tmp_path / "work"),
           "TUNER_TRAIN_B64": pod_bundle_b64(), "PYTHONPATH": ""}
    proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "pod program never answered /health"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/progress", timeout=5).status_code == 401
        assert (tmp_path / "opt" / "jobs" / "train.py").is_file()
        installs = (tmp_path / "pip.log").read_text().splitlines()
        assert installs and "unsloth" in installs[0].split()  # QLoRA stack first
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


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
