"""Does a training job fit the cluster? Checked before a job starts (layer: dcgan).

Ray waits, silently and for ever, for a placement group the cluster cannot hold (12+ minutes of nothing for
`--workers 8` on a small machine). So the driver compares what the workers ask for with what the cluster has, or
with what its autoscaler may grow it to (Ray's cluster config, when an autoscaler wrote one), and refuses at once,
in one line naming both. Ray Data's reader needs a quarter CPU beside the workers (without it the stream never
starts), so that is part of the ask. Workers that fit but never come (another job holds the CPUs, an autoscaler's
GPU node never arrives) are waited for `workers_wait_s()`, then one line too (`never_placed`).
"""

from __future__ import annotations

from typing import Any

from dcgan.config import ClusterConfig, ConfigError
from preprocessing.errors import TransientError
from preprocessing.compute import WAIT_ENV, autoscaler_maximum, workers_wait_s

READER_CPUS = 0.25  # ingest.training_dataset: a read asks for at least this much CPU


class WorkersNeverCame(TransientError):
    """The training workers fit the cluster but were not placed within the wait (transient: they may come later)."""


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _ask(cluster: ClusterConfig) -> tuple[dict[str, float], dict[str, float], str]:
    """(one worker's resources, the whole ask, the ask in words)."""
    per_worker: dict[str, float] = {"CPU": cluster.cpus_per_worker, **({"GPU": 1.0} if cluster.use_gpu else {})}
    asked = {k: v * cluster.workers for k, v in per_worker.items()}
    asked["CPU"] += READER_CPUS
    what = (f"cluster.workers={cluster.workers} x ({_fmt(per_worker)}) plus {READER_CPUS:g} CPU for reading data "
            f"asks for {_fmt(asked)}")
    return per_worker, asked, what


def check_fits(cluster: ClusterConfig) -> None:
    """ConfigError (one line) when the training workers cannot all be placed; nothing when they can, or when no Ray
    is connected in this process."""
    import ray

    if not ray.is_initialized():
        return
    per_worker, asked, what = _ask(cluster)
    maximum = autoscaler_maximum()
    totals: dict[str, Any] = maximum or ray.cluster_resources()
    has = "can grow to" if maximum else "has"
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


def _startup_timeouts(err: BaseException) -> bool:
    """Ray Train gave up placing the worker group (its WorkerGroupStartupTimeoutError, inside Ray's wrappers)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == "WorkerGroupStartupTimeoutError":
            return True
        todo += [getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return False


def never_placed(err: BaseException, cluster: ClusterConfig, waited_s: float | None = None) -> WorkersNeverCame | None:
    """The one-line fault for a training whose workers were never placed (what was asked, what the cluster has and
    has free now), or None when `err` is something else."""
    if not _startup_timeouts(err):
        return None
    import ray

    _, asked, what = _ask(cluster)
    total, free = ray.cluster_resources(), ray.available_resources()
    has = _fmt({k: float(total.get(k, 0)) for k in asked})
    idle = _fmt({k: float(free.get(k, 0)) for k in asked})
    wait = workers_wait_s() if waited_s is None else waited_s
    return WorkersNeverCame(f"{what}; the cluster has {has} ({idle} free now) and did not place the workers within "
                            f"{wait:g} s ({WAIT_ENV}): other jobs hold the resources, or the nodes an autoscaler was to "
                            "add never came; free them, lower --workers or cluster.cpus_per_worker, or add nodes")
