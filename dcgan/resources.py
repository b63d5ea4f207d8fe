"""Does a training job fit the cluster? Checked before a job starts (layer: dcgan).

Ray waits, silently and for ever, for a placement group the cluster cannot hold (12+ minutes of nothing for
`--workers 8` on a small machine). So the driver compares what the workers ask for with what the cluster has, or
with what its autoscaler may grow it to (Ray's cluster config, when an autoscaler wrote one), and refuses at once,
in one line naming both. Ray Data's reader needs a quarter CPU beside the workers (without it the stream never
starts), so that is part of the ask.
"""

from __future__ import annotations

from typing import Any

from dcgan.config import ClusterConfig, ConfigError

READER_CPUS = 0.25  # ingest.training_dataset: a read asks for at least this much CPU


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _autoscaler_maximum() -> dict[str, float] | None:
    """What an autoscaling cluster may grow to, or None for a fixed cluster (Ray's own check reads the same)."""
    try:
        from ray._private import state as ray_state

        return ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray: no autoscaler information, judge the cluster as it is
        return None


def check_fits(cluster: ClusterConfig) -> None:
    """ConfigError (one line) when the training workers cannot all be placed; nothing when they can, or when no Ray
    is connected in this process."""
    import ray

    if not ray.is_initialized():
        return
    per_worker: dict[str, float] = {"CPU": cluster.cpus_per_worker, **({"GPU": 1.0} if cluster.use_gpu else {})}
    asked = {k: v * cluster.workers for k, v in per_worker.items()}
    asked["CPU"] += READER_CPUS
    maximum = _autoscaler_maximum()
    totals: dict[str, Any] = maximum or ray.cluster_resources()
    has = "can grow to" if maximum else "has"
    what = (f"cluster.workers={cluster.workers} x ({_fmt(per_worker)}) plus {READER_CPUS:g} CPU for reading data "
            f"asks for {_fmt(asked)}")
    short = [k for k, v in asked.items() if v > float(totals.get(k, 0)) + 1e-9]
    if short:
        raise ConfigError(f"{what}, but the cluster {has} {_fmt({k: float(totals.get(k, 0)) for k in asked})}: "
                          f"lower --workers or cluster.cpus_per_worker{' or --no-gpu' if 'GPU' in short else ''}, "
                          f"or add nodes")
    if maximum:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_node = [int(min(node.get(k, 0) / v for k, v in per_worker.items())) for node in nodes]
    fits = {"STRICT_PACK": max(per_node, default=0),  # all on one node
            "STRICT_SPREAD": sum(1 for n in per_node if n)}.get(cluster.placement, sum(per_node))  # one per node
    if fits < cluster.workers:
        raise ConfigError(f"{what}, but the cluster's {len(nodes)} node(s) can place only {fits} such worker(s) "
                          f"with cluster.placement {cluster.placement}: lower cluster.cpus_per_worker or --workers, "
                          f"or change cluster.placement")
