"""Process helpers for all the tests that start processes: each started in a session of its own and stopped by its
process group or session, by process id and never by name; the processes below a pid (to inject faults into exactly
the ones a test started); waiting on a condition; HTTP and port probes on 127.0.0.1; and a real MLflow tracking
server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# Starting and stopping: a session of its own, stopped by process id
# ----------------------------------------------------------------------------------------------------------


def start(cmd, log: Path, env=None, cwd=None, errors: Path | None = None, append: bool = False) -> subprocess.Popen:
    """``cmd`` in a session of its own (stop it with :func:`stop_group` or :func:`stop_session`), its output
    written to ``log``, its stderr to ``errors`` when given (else to ``log`` too)."""
    mode = "a" if append else "w"
    with (
        open(log, mode) as out,
        open(errors, mode) if errors else contextlib.nullcontext(subprocess.STDOUT) as err,
    ):
        return subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)


def exit_status(proc: subprocess.Popen) -> int | None:
    """``proc``'s return code once it has ended (negative: the signal that ended it), else None. It does not reap
    ``proc``: until ``proc.wait()`` its pid (its session and group id) cannot be reused."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already
        return proc.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def exited(proc: subprocess.Popen) -> bool:
    return exit_status(proc) is not None


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def session_members(sid: int) -> list[int]:
    """Process ids in session ``sid`` (the leader excluded): what a process started with
    ``start_new_session=True`` and its descendants are, unless one made a session of its own."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == sid:
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_session(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the leader alone (`ray start --block` stops its node's processes itself, some in process groups of
    their own), then SIGTERM and at last SIGKILL whatever is left of its session, by process id."""
    if not exited(proc):
        _signal([proc.pid], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not exited(proc) and time.monotonic() < deadline:
            time.sleep(0.2)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        left = session_members(proc.pid) + ([] if exited(proc) else [proc.pid])
        if not left:
            break
        _signal(left, sig)
        deadline = time.monotonic() + wait
        while (session_members(proc.pid) or not exited(proc)) and time.monotonic() < deadline:
            time.sleep(0.2)
    proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------------
# Looking at processes, waiting on them
# ----------------------------------------------------------------------------------------------------------


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


def tail(path: Path, n: int = 3000) -> str:
    try:
        return f"--- {path.name} ---\n" + path.read_text(errors="replace")[-n:]
    except OSError:
        return f"--- {path.name}: none ---"


def wait_for(
    predicate,
    timeout: float,
    what: str,
    proc: subprocess.Popen | Sequence[subprocess.Popen] | None = None,
    interval: float = 0.2,
    logs: Sequence[Path] = (),
):
    """Until ``predicate()`` is true; returns its value. Fails if ``proc`` (or any of several) ends first or
    ``timeout`` seconds pass, with the tails of ``logs`` in the message."""
    procs = [] if proc is None else [proc] if isinstance(proc, subprocess.Popen) else list(proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if (status := exit_status(p)) is not None:
                raise AssertionError(f"process ended ({status}) while waiting for {what}: {p.args[:3]}" + _tails(logs))
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + _tails(logs))


def _tails(logs: Sequence[Path]) -> str:
    return "".join("\n" + tail(log) for log in logs)


# ----------------------------------------------------------------------------------------------------------
# Servers on 127.0.0.1
# ----------------------------------------------------------------------------------------------------------


def http_status(url: str, host: str | None = None, timeout: float = 5.0) -> int | None:
    """The HTTP status of a GET of ``url`` (with another ``Host`` header when given); None if nothing answers."""
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def mlflow_healthy(uri: str) -> bool:
    return http_status(f"{uri}/health", timeout=2) == 200


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
    log = root / "server.log"
    proc = start(cmd, log, env=env, append=True)
    try:
        wait_for(lambda: mlflow_healthy(f"http://127.0.0.1:{port}"), timeout, "the MLflow server", proc, 0.5, [log])
    except AssertionError:
        stop_group(proc)
        raise
    return proc


#: Python source to put first in a ``python -c`` program: importing ``stbp`` fails after it, so that what follows
#: shows a registered model needs only torch and MLflow.
WITHOUT_STBP = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "stbp":
            raise ImportError("stbp is not available here")
sys.meta_path.insert(0, Block())
"""
