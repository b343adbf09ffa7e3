"""The workdir's own Prefect server: started on demand on loopback, reused by later commands, stopped on request.

Its state lives in `<workdir>/.server/` (or `$PIXART_SERVER_HOME`): the SQLite database (run history, logs,
Prefect artifacts), the server's log and `server.json`, the record of the running server (pid, port, start
time). The server runs detached (a session of its own), so it outlives the command that started it and the
"View at http://127.0.0.1:..." links in the log keep working. A lock on the directory makes a second command
starting at the same moment wait and reuse the first one's server; a record whose process is gone (or is some
other process now) is replaced. Nothing here imports Prefect: `pixart server status` answers at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from fsspec.core import split_protocol

from tasks.locks import locked

SERVER_DIR = ".server"  # inside the workdir
HOME_ENV = "PIXART_SERVER_HOME"  # overrides <workdir>/.server, and gives a remote workdir a local server
PORT_ENV = "PIXART_SERVER_PORT"  # a fixed port instead of a free one
START_TIMEOUT = 180  # seconds; a loaded 2-core machine took 21 s


class ServerFailed(RuntimeError):
    """The local Prefect server did not come up; the message ends with its log."""


@dataclass(frozen=True)
class ServerRecord:
    """What `server.json` keeps about the running server."""

    pid: int
    port: int
    started: float  # time.time() at start
    database: str
    log: str

    @property
    def url(self) -> str:
        """The UI (the API is at `/api`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def uptime(self) -> str:
        seconds = int(time.time() - self.started)
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def server_home(workdir: str) -> Path | None:
    """Where the server of `workdir` keeps its state: $PIXART_SERVER_HOME, else `<workdir>/.server` as an absolute
    path; None for a remote workdir (s3://, gs://) with no override."""
    if override := os.environ.get(HOME_ENV):
        return Path(override).resolve()
    protocol, path = split_protocol(workdir)
    if protocol not in (None, "file", "local"):
        return None
    return Path(path).resolve() / SERVER_DIR


def running_server(home: Path) -> ServerRecord | None:
    """The recorded server if its process is alive and answers; None otherwise."""
    record = read_record(home)
    if record is None or not is_server_process(record) or not healthy(record):
        return None
    return record


def ensure_server(home: Path, port: int | None = None) -> tuple[ServerRecord, bool]:
    """(the server of `home`, whether this call started it): the running one, else a new one.

    port: where a new server listens (default: $PIXART_SERVER_PORT, else a free loopback port).
    """
    with locked(str(home)):  # one starter at a time: the next one finds this one's server running
        record = read_record(home)
        if record is not None and is_server_process(record) and answers(record):  # slow under load is not dead
            return record, False
        discard_record(home)
        return start_server(home, port), True


def stop_server(home: Path) -> ServerRecord | None:
    """Stop the server of `home`; returns its record, or None if none was running. A stale record is removed."""
    if not record_path(home).exists():
        return None
    with locked(str(home)):
        record = read_record(home)
        running = record is not None and is_server_process(record)
        discard_record(home)
    return record if running else None


# ---------------------------------------------------------------------------------------------------
#                                     The record and the process
# ---------------------------------------------------------------------------------------------------


def record_path(home: Path) -> Path:
    return home / "server.json"


def read_record(home: Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(record_path(home).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):  # none, or not ours to read: start afresh
        return None


def discard_record(home: Path) -> None:
    """Stop the recorded process if it is still our server, then forget it."""
    record = read_record(home)
    if record is not None and is_server_process(record):
        terminate(record.pid)
    record_path(home).unlink(missing_ok=True)


def is_server_process(record: ServerRecord) -> bool:
    """True if `record.pid` is alive and is the Prefect server started for this record (not a reused pid)."""
    if not alive(record.pid):
        return False
    try:
        command = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:  # no /proc (macOS): the pid alone
        return True
    except OSError:
        return False
    return b"prefect" in command and b"server" in command and str(record.port).encode() in command


def alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, and it has exited (reaped now)
            return False
    except ChildProcessError:  # not our child: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie (exited, its parent has not reaped it yet: containers whose init does not) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):  # no /proc (macOS)
        return True


def healthy(record: ServerRecord, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{record.api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def answers(record: ServerRecord, timeout: float = START_TIMEOUT) -> bool:
    """Wait until the recorded server answers (True), or its process is gone or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not healthy(record, timeout=2.0):
        if not is_server_process(record) or time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def terminate(pid: int, grace: float = 20.0) -> None:
    """SIGTERM to the server's process group (it leads its session), SIGKILL if it is still there after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.1)


def free_port(port: int = 0) -> int:
    """`port` if it is free on 127.0.0.1 (else ServerFailed: whatever answers there is not this server), or a
    free one for 0."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            raise ServerFailed(
                f"port {port} on 127.0.0.1 is taken ({err.strerror}): choose another (--port, ${PORT_ENV}) or "
                "leave both unset for a free one"
            ) from err
        return s.getsockname()[1]


def start_server(home: Path, port: int | None = None) -> ServerRecord:
    """Start `prefect server start` on loopback, detached, with its database in `home`; wait until it answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port(port or int(os.environ.get(PORT_ENV) or 0))
    database, log = home / "prefect.db", home / "server.log"
    record = ServerRecord(pid=0, port=port, started=time.time(), database=str(database), log=str(log))
    env = os.environ | {
        "PREFECT_HOME": str(home),  # its profiles, UI build and database here, not in ~/.prefect
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
        "PREFECT_API_URL": record.api_url,  # what its UI calls
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    record = ServerRecord(**(asdict(record) | {"pid": process.pid}))
    record_path(home).write_text(json.dumps(asdict(record), indent=1))  # before it answers: `stop` can find it
    if not answers(record):
        what = "did not answer" if is_server_process(record) else "exited"
        discard_record(home)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ServerFailed(
            f"the local Prefect server on port {port} {what} within {START_TIMEOUT} s; the end of {log}:\n  "
            + "\n  ".join(tail)
        )
    return record
