"""`nudge serve` as a user runs it: embedded Redis, local Ray, signals, kill -9, restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.factories import track

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer dev-admin-key"}
WRITE = ("dev-write-key", "")


class Engine:
    """One `nudge serve` process on its own data dir."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.args = args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.listening = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> Engine:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NUDGE_", "RAY_ADDRESS"))}
        env["NUDGE_CHECKPOINT_INTERVAL_MS"] = "100"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.args,
            ],
            env=env,
            cwd=self.data_dir.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            # As the README says: once this line is out, the engine answers.
            if not self.listening.wait(90) or self.proc.poll() is not None:
                raise AssertionError("no 'listening' line:\n" + self.output(timeout=1))
            assert httpx.get(f"{self.base}/healthz", timeout=15).status_code == 200
        except BaseException:
            self.proc.send_signal(signal.SIGTERM)  # leave no engine behind a failed start
            self.proc.wait(30)
            raise
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("nudge: listening on"):
                self.listening.set()
        self.listening.set()  # the process ended: let start() report it

    def output(self, timeout: float = 15) -> str:
        """Everything the process printed (all of it once it has exited)."""
        if self._reader is not None:
            self._reader.join(timeout)
        return "".join(self.lines)

    def children(self) -> list[int]:
        """Pids of the shard workers and the embedded Redis."""
        shards = httpx.get(f"{self.base}/v1/status", headers=ADMIN, timeout=10).json()["shards"]
        redis_pid = int((self.data_dir / "redis" / "redis.pid").read_text())
        return [s["pid"] for s in shards] + [redis_pid]

    def profile(self, customer: str) -> dict:
        return httpx.get(f"{self.base}/v1/profiles/{customer}", headers=ADMIN, timeout=30).json()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_serve_stop_restart_and_kill_9(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "data").start()
    batch = [track(f"s{n % 3}", "Product Added", product_id=f"p{n}", price=2.0) for n in range(30)]
    assert (
        httpx.post(f"{engine.base}/v1/batch", auth=WRITE, json={"batch": batch}).status_code == 200
    )
    before = {c: engine.profile(c) for c in ("s0", "s1", "s2")}
    assert before["s0"]["counts"] == {"Product Added": 10}
    children = engine.children()

    # SIGTERM: clean stop within 10 s, nothing left behind.
    started = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    assert "stopped cleanly" in engine.output()
    time.sleep(0.5)  # the kernel reaps Ray's workers just after their parent
    assert [pid for pid in children if alive(pid)] == []

    # Start again on the same data: the profiles are exactly as they were.
    engine = Engine(tmp_path / "data").start()
    assert {c: engine.profile(c) for c in ("s0", "s1", "s2")} == before

    # kill -9 of the whole engine while events stream in; every acknowledged event survives once.
    acked = {"k": 0, "sent": 0}
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=engine.base, timeout=5) as client:
            while not stop.is_set():
                acked["sent"] += 20
                try:
                    reply = client.post(
                        "/v1/batch", auth=WRITE, json={"batch": [track("k9") for _ in range(20)]}
                    )
                except httpx.HTTPError:
                    return
                if reply.status_code == 200:
                    acked["k"] += 20

    sender = threading.Thread(target=send)
    sender.start()
    while acked["k"] < 400:
        time.sleep(0.01)
    os.killpg(engine.proc.pid, signal.SIGKILL)
    engine.proc.wait(10)
    stop.set()
    sender.join(10)

    engine = Engine(tmp_path / "data").start()
    try:
        # Every acknowledged event is there exactly once; the one request cut off
        # mid-flight may or may not have been stored (the SDK would retry it, and
        # dedupe would absorb the repeat), but never half of it.
        count = engine.profile("k9")["counts"]["Product Viewed"]
        assert acked["k"] <= count <= acked["sent"] and count % 20 == 0
        assert engine.profile("s1") == before["s1"]
    finally:
        engine.proc.send_signal(signal.SIGINT)
        engine.proc.wait(15)


def test_workers_serve_the_config_and_flags_the_engine_was_started_with(tmp_path: Path) -> None:
    # Each uvicorn worker loaded ./config.toml by itself: --config and the flags were
    # ignored, so the dev keys answered on an address the parent refused them on,
    # and a --shards other than the file's left the workers looking for shards
    # that did not exist (and `nudge serve` exited 0).
    own = tmp_path / "own.toml"
    own.write_text(
        '[auth]\nwrite_keys = ["own-write"]\ncontent_keys = ["own-content"]\n'
        'admin_keys = ["own-admin"]\n'
    )
    engine = Engine(tmp_path / "data", "--config", str(own), "--workers", "2", "--shards", "2")
    engine.start()
    try:
        with httpx.Client(base_url=engine.base, timeout=15) as client:
            for _ in range(8):  # new connections: both workers answer some
                client.headers["Connection"] = "close"
                status = client.get("/v1/status", headers={"Authorization": "Bearer own-admin"})
                assert status.status_code == 200 and len(status.json()["shards"]) == 2
                dev = client.get("/v1/status", headers=ADMIN)
                assert dev.status_code == 401
    finally:
        engine.proc.send_signal(signal.SIGTERM)
        code = engine.proc.wait(30)
    assert code == 0 and "stopped cleanly" in engine.output()
    # the file with the keys is gone with the engine
    assert list((tmp_path / "data" / "run").iterdir()) == []


def test_the_config_handed_to_workers_is_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from engine.config import load
    from engine.serve import WORKER_CONFIG_ENV, _hand_to_workers, worker_config

    monkeypatch.delenv(WORKER_CONFIG_ENV, raising=False)
    config = load(None, env={})
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, workers=3),
        engine=dataclasses.replace(config.engine, data_dir=str(tmp_path / "data")),
    )
    path = _hand_to_workers(config)
    try:
        assert os.environ[WORKER_CONFIG_ENV] == str(path)
        assert path.parent == (tmp_path / "data" / "run").resolve()
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        assert worker_config() == config
        assert path.name == f"worker-config-{os.getpid()}.pickle"  # engines may share a dir
        dead = path.with_name("worker-config-999999999.pickle")  # a kill -9 left it
        dead.write_bytes(b"stale")
        assert _hand_to_workers(config) == path and not dead.exists()
        assert worker_config() == config
    finally:
        monkeypatch.delenv(WORKER_CONFIG_ENV)
