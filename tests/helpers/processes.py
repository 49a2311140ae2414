"""Processes a test starts: where the repository is, a free port, a deadline on every wait
(a hang is a failure of the test, never a hung suite), and killing a whole job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_in_own_group(command: list[str], **popen_args) -> subprocess.Popen:
    """``command`` with its output captured as text, in a process group of its own, so that
    ``kill_group`` ends it together with every process it started."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_args)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def output_by_deadline(proc: subprocess.Popen, timeout: float, stalled: str,
                       kill: Callable[[], None] | None = None) -> tuple[str, str]:
    """``proc``'s (stdout, stderr) once it exits. Still running after ``timeout`` seconds, it
    is killed (its process group, or by ``kill``) and the test fails with ``stalled``."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if kill is None:
            kill_group(proc)
        else:
            kill()
        pytest.fail(stalled)


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_job(proc: subprocess.Popen, pids: list[int], timeout: float = 60) -> None:
    """SIGKILL the whole job, as a scheduler does: the launcher's process group and every rank
    (torchrun and the deepspeed launcher start ranks outside it; killed alone, the launcher
    would leave them training on and writing checkpoints), and wait until all are gone."""
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(map(running, pids)):
        assert time.monotonic() < deadline, f"ranks {pids} outlived SIGKILL"
        time.sleep(0.05)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists; fails at once if ``proc`` exits first, and after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
