"""Process helpers for the end-to-end tests: the processes below a pid (to inject faults into exactly the
ones a test started), waiting on a condition, and a real MLflow tracking server on 127.0.0.1 that is started
in its own session and stopped by its process group id, never by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc; no psutil needed)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, interval=0.2):
    """Until ``predicate()`` is true; fails if ``proc`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group ``proc`` leads (it was started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if group_alive(proc.pid):  # children that outlived their leader
        os.killpg(proc.pid, signal.SIGKILL)


def mlflow_healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_mlflow_server(root: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` with its store under ``root``, up and healthy.

    Its own session: its gunicorn/uvicorn workers are stopped with it by :func:`stop_group`. The same ``root``
    and ``port`` bring the same server back after a stop."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "a")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: mlflow_healthy(uri), timeout, "the MLflow server", proc, interval=0.5)
    except AssertionError as exc:
        stop_group(proc)
        text = (root / "server.log").read_text()[-4000:]
        raise AssertionError(f"{exc}; its log:\n{text}") from None
    return proc
