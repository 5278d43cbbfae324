"""All of Nudge's Ray calls that set things up: start or join Ray, create and find shards."""

from __future__ import annotations

import contextlib
import logging
import os

import ray

from actors.shard import ShardActor
from engine.config import EngineConfig
from engine.errors import Unavailable

log = logging.getLogger(__name__)

NAMESPACE = "nudge"
# Ray places an actor that asks for no resources on a random node, whatever its
# scheduling strategy says (hard node affinity aside); a hundredth of a CPU
# makes SPREAD and soft node affinity mean what they say.
ACTOR_CPUS = 0.01


def shard_name(index: int) -> str:
    """The Ray actor name of shard `index`."""
    return f"shard-{index}"


def start_ray(address: str = "", *, namespace: str = NAMESPACE, num_cpus: int | None = None) -> str:
    """Join the cluster at `address`, or start a local one; returns the GCS address."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    options = {
        "namespace": namespace,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": False,
    }
    # Ray starts workers at nice 15, which starves the shards behind the API and
    # Redis on a busy machine; they are the engine's hot path, not background work.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, **options)
    else:
        # "local" forces a new cluster even when another one runs on this machine.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **options)
    return ray.get_runtime_context().gcs_address


def remote_shard_class(max_restarts: int = -1):
    """ShardActor as a restartable Ray actor class (ray.remote applied late)."""
    return ray.remote(
        num_cpus=ACTOR_CPUS, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=1000
    )(ShardActor)


def ensure_shards(
    settings: EngineConfig,
    redis_url: str,
    *,
    rules: tuple[tuple[str, str], ...] = (),
    detached: bool = False,
    insight: object = None,
) -> list:
    """Create the shard actors that do not exist yet and return handles to all of them."""
    cls = remote_shard_class()
    nodes = alive_nodes()
    handles = []
    for index in range(settings.shards):
        options = actor_options(
            shard_name(index), settings.ray_namespace, detached=detached, node=place(index, nodes)
        )
        handles.append(
            cls.options(**options).remote(
                index,
                settings.shards,
                settings,
                redis_url,
                rules=rules,
                insight=insight,
                quiet_heap=True,
                serve_reads=True,
            )
        )
    return handles


def find_shard(settings: EngineConfig, index: int):
    """A handle to the existing shard actor `index`, looked up by name."""
    return ray.get_actor(shard_name(index), namespace=settings.ray_namespace)


def find_shards(settings: EngineConfig) -> list:
    """Handles to all existing shard actors, looked up by name."""
    return [find_shard(settings, i) for i in range(settings.shards)]


def shard_client(settings: EngineConfig):
    """A ShardClient over the named shards that re-finds a shard started anew."""
    from actors.client import ShardClient

    return ShardClient(
        find_shards(settings),
        resolve=lambda index: find_shard(settings, index),
        direct_reads=settings.direct_reads,
    )


def alive_nodes() -> list[str]:
    """Ids of the cluster's alive nodes that can hold an engine actor, in a stable order."""
    return usable_nodes(ray.nodes())


def usable_nodes(nodes: list[dict]) -> list[str]:
    """Of `ray.nodes()`, the alive ones with the CPU an engine actor reserves (a head
    started with --num-cpus=0 has none), sorted by id."""
    return sorted(
        node["NodeID"]
        for node in nodes
        if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= ACTOR_CPUS
    )


def place(index: int, nodes: list[str]) -> str | None:
    """The node for the `index`-th actor of a kind: round robin, None on a single node."""
    return nodes[index % len(nodes)] if len(nodes) > 1 else None


def actor_options(name: str, namespace: str, *, detached: bool, node: str | None = None) -> dict:
    """Ray options of an engine actor: named, found again if it exists, placed on `node`.

    SPREAD's round robin is shared with every other placement the raylet makes;
    a soft affinity to a chosen node spreads the engine's actors evenly and
    still lets Ray restart one elsewhere when its node is gone, or place it
    elsewhere when the node has no CPU to spare (rather than wait for one).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = (
        NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)
        if node
        else "SPREAD"
    )
    options = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "scheduling_strategy": strategy,
    }
    if detached:
        options["lifetime"] = "detached"
    return options


def wait_ready(handles: list, timeout: float = 60.0, *, what: str = "shard") -> None:
    """Block until every actor's status says ready (shards: checkpoint loaded, stream replayed)."""
    import time

    deadline = time.monotonic() + timeout
    pending = list(handles)
    while pending:
        statuses = ray.get(
            [h.status.remote() for h in pending], timeout=max(deadline - time.monotonic(), 1)
        )
        pending = [h for h, s in zip(pending, statuses, strict=True) if not s["ready"]]
        if pending and time.monotonic() > deadline:
            raise Unavailable(
                f"{len(pending)} {what}(s) not ready after {timeout:.0f} s (see their log lines)",
                code="not_ready",
            )
        if pending:
            time.sleep(0.05)


def stop_shards(handles: list, timeout: float = 5.0) -> None:
    """Final checkpoint on every shard, then end the actors."""
    try:
        ray.get([h.stop.remote() for h in handles], timeout=timeout)
    except Exception as exc:  # a shard that cannot checkpoint now replays on next start
        log.warning("final checkpoint incomplete: %s", exc)
    for handle in handles:
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
