"""`nudge serve`: start (or join) Redis and Ray, make sure the shards run, serve HTTP."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import time
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from engine.config import Config, load, warn_dev_keys
from engine.errors import ConfigError, Unavailable
from engine.metrics.multiproc import prepare_multiproc_dir, remove_multiproc_dir
from engine.redis_server import EmbeddedRedis, pid_running
from engine.store import shown_url

log = logging.getLogger(__name__)


def _shards_factory(config: Config):
    async def connect():
        from actors.cluster import shard_client

        return shard_client(config.engine)

    return connect


# The resolved Config, for uvicorn's worker processes: a private file named by this
# variable. Each worker used to load() ./config.toml itself, without the --config
# file, the command line's overrides or the parent's checks (the dev keys on a
# public address were served that way).
WORKER_CONFIG_ENV = "NUDGE_WORKER_CONFIG"


def _hand_to_workers(config: Config) -> Path:
    """Write `config` where the workers read it; the file (owner-only: it holds the keys).

    In the data dir, not a temporary one a cleaner may empty while the engine runs
    (a worker uvicorn restarts reads it again), named by this process, as engines
    on an external Redis may share a data dir; those a kill -9 left are removed.
    """
    run = Path(config.engine.data_dir).resolve() / "run"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    run.chmod(0o700)
    for old in run.glob("worker-config-*.pickle"):
        pid = old.stem.rpartition("-")[2]
        if not pid.isdigit() or not pid_running(int(pid), "nudge"):
            old.unlink(missing_ok=True)
    path = run / f"worker-config-{os.getpid()}.pickle"
    path.unlink(missing_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        pickle.dump(config, out)
    os.environ[WORKER_CONFIG_ENV] = str(path)
    return path


def worker_config() -> Config:
    """The Config the parent `nudge serve` resolved (load() when run some other way)."""
    path = os.environ.get(WORKER_CONFIG_ENV)
    if not path:
        return load()
    with open(path, "rb") as handed:
        return pickle.load(handed)  # written by our own parent, owner-only (see above)


def _check_redis(url: str) -> None:
    """Fail at once, naming it, if the configured Redis does not answer (the shards
    would retry their recovery for a minute before the start gave up)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        raise ConfigError(
            f"engine.redis_url {shown_url(url)!r}: {exc}", field="engine.redis_url"
        ) from None
    try:
        client.ping()
    except redis.exceptions.BusyLoadingError:
        pass  # there, loading its data: the shards wait for it
    except (redis.RedisError, OSError) as exc:
        raise Unavailable(
            f"cannot reach Redis at {shown_url(url)}: {exc}", code="redis_unreachable"
        ) from None
    finally:
        client.close()


def worker_app():
    """App factory for uvicorn worker processes (several workers): joins the running Ray."""
    from actors.cluster import start_ray
    from engine.api import create_app

    config = worker_config()
    # ray.init installs its own SIGTERM handler; keep uvicorn's, so workers drain.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    start_ray(config.engine.ray_address, namespace=config.engine.ray_namespace)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return create_app(config, config.engine.redis_url, _shards_factory(config), quiet_heap=True)


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's server, printing `line` once it listens and the app has started."""

    def __init__(self, config: uvicorn.Config, line: str):
        super().__init__(config)
        self.line = line

    async def startup(self, sockets: list | None = None) -> None:
        """Start as uvicorn does; then say so, when a request can be answered."""
        await super().startup(sockets=sockets)
        if self.started:
            print(self.line, flush=True)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, remembering if a signal stopped it
    (it returns the same way when a worker could not start)."""

    asked_to_stop = False

    def handle_int(self) -> None:
        self.asked_to_stop = True
        super().handle_int()

    def handle_term(self) -> None:
        self.asked_to_stop = True
        super().handle_term()


def _run_workers(workers: int, options: dict, listening: str) -> bool:
    """Serve with `workers` processes, as uvicorn.run does; True if stopped by a signal."""
    config = uvicorn.Config("engine.serve:worker_app", factory=True, workers=workers, **options)
    sock = config.bind_socket()
    try:
        # Listening from here (each worker's server only listens once it has started,
        # seconds later: until then connections were refused after the line below),
        # so requests wait in the backlog until a worker accepts them.
        sock.listen(config.backlog)
        print(listening, flush=True)
        supervisor = _Supervisor(config, sockets=[sock])
        supervisor.run()
    finally:
        sock.close()
    return supervisor.asked_to_stop


class _Stop(Exception):
    """SIGTERM arrived: leave the server loop and shut down cleanly."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def serve(config: Config) -> None:
    """Run the engine until SIGTERM or Ctrl-C, then stop everything it started."""
    from actors.cluster import ensure_shards, start_ray, stop_shards, wait_ready
    from actors.dispatcher import ensure_dispatchers, stop_dispatchers, wait_dispatchers
    from actors.insight import insight_settings
    from engine.api import create_app

    warn_dev_keys(config)
    if config.delivery.templates_dir:
        from engine.delivery.templates import TemplateSet

        # Here, not first in the dispatchers once Ray and the shards have started.
        TemplateSet(config.delivery.templates_dir)
    started = time.monotonic()
    embedded = None
    redis_url = config.engine.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(
            os.path.join(config.engine.data_dir, "redis"),
            fsync=config.engine.redis_fsync,
            rewrite_percentage=config.engine.redis_aof_rewrite_percentage,
            rewrite_min_mb=config.engine.redis_aof_rewrite_min_mb,
        )
        redis_url = embedded.start()
    else:
        _check_redis(redis_url)
    handles = []
    dispatchers: list = []
    joined = bool(config.engine.ray_address)
    metrics_dir = None
    handoff = None
    failed = False
    try:
        gcs = start_ray(config.engine.ray_address, namespace=config.engine.ray_namespace)
        handles = ensure_shards(
            config.engine,
            redis_url,
            rules=config.rules,
            detached=joined,
            insight=insight_settings(config),
        )
        wait_ready(handles)
        log.info("%d shards ready in %.1f s", len(handles), time.monotonic() - started)
        engine = dataclasses.replace(config.engine, redis_url=redis_url, ray_address=gcs)
        config = dataclasses.replace(config, engine=engine)
        dispatchers = ensure_dispatchers(config, redis_url, detached=joined)
        wait_dispatchers(dispatchers)
        uv_options = {
            "host": config.server.host,
            "port": config.server.port,
            "log_level": "warning",
            "access_log": False,
            "timeout_graceful_shutdown": config.server.shutdown_timeout_s,
        }
        listening = (
            f"nudge: listening on http://{config.server.host}:{config.server.port} "
            f"({config.engine.shards} shards, Redis {shown_url(redis_url)})"
        )
        # uvicorn re-raises the signal it caught once it has drained; with this
        # handler (set after ray.init, which installs its own) that becomes an
        # exception we clean up after.
        signal.signal(signal.SIGTERM, _raise_stop)
        if config.server.workers > 1:
            metrics_dir = prepare_multiproc_dir(config.engine.data_dir)
            handoff = _hand_to_workers(config)  # with this Redis and Ray
            if not _run_workers(config.server.workers, uv_options, listening):
                failed = True
        else:
            app = create_app(config, redis_url, _shards_factory(config), quiet_heap=True)
            # Printed once bound and started, so a client may call at once.
            _AnnouncingServer(uvicorn.Config(app, **uv_options), listening).run()
            # It returns by itself only when it could not serve: a stop by signal
            # comes back as an exception (see _raise_stop).
            failed = True
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        # Ignore a second Ctrl-C while we checkpoint and shut down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopping = time.monotonic()
        if dispatchers and not joined:
            stop_dispatchers(dispatchers, timeout=config.server.shutdown_timeout_s)
        if handles and not joined:
            stop_shards(handles)
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None:
            remove_multiproc_dir(metrics_dir)
        if handoff is not None:
            handoff.unlink(missing_ok=True)
        print(f"nudge: stopped cleanly in {time.monotonic() - stopping:.1f} s", flush=True)
    if failed:
        raise Unavailable(
            "the HTTP server stopped without being asked to (see the log above)",
            code="server_stopped",
        )
