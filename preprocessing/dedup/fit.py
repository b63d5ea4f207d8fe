"""Where the dedup autoencoder trains, as the driver asks for it (layer: preprocessing, no torch at import).

On CPUs, up to `IN_MEMORY_ROWS` crops (the default `train_images` cap is 50k): one plain Ray task (`fit_task`) that
holds them in memory and trains as `model.fit_local` does (`model.fit_blocks`), with up to `model.TRAIN_THREADS`
torch threads; Ray runs it again on a lost node up to `cluster.max_failures` times. Otherwise on Ray Train
(`model.fit_ray_train`), launched as the GAN's training is (`preprocessing.ray_train`: the same failure policy,
retries and faults), on the workers `cluster` asks for: `cluster.workers` GPUs with `use_gpu`, or one CPU worker with
half a CPU that streams its crops from Ray Data every epoch.

One CPU worker was all Ray Train ever ran here (DDP on CPUs only splits the same cores), and its controller and worker
group cost ~8 s a fit, more than the fit itself on small sets: the task is 3.6x faster on 512 crops and 1.55x on
20,000 (benchmarks/dedup_fit.py, the same losses).

The task hands back numpy weights and the bytes of model.pt, so the driver of a CPU fit never imports torch (part of
a dedup's fixed cost): it writes the file and sends the weights on to the encode tasks as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing.config import ClusterConfig, DedupConfig

# A fit's crops are held in memory (one task on CPUs, or each Ray Train worker's share) up to this many (3 KB a crop
# at crop 32: 1.5 GB; the default `train_images` cap, 50k, is 150 MB); a larger set trains on Ray Train, streaming
# its crops from Ray Data every epoch.
IN_MEMORY_ROWS = 500_000


@dataclass
class Fitted:
    """A trained autoencoder: its folded weights, the reconstruction loss of each epoch, and model.pt's bytes."""

    state: dict[str, np.ndarray]
    losses: list[float]
    model_file: bytes  # `model.save_state`'s file: `torch.load(weights_only=True)` reads it back


def fit_ray(crops_ds, cfg: DedupConfig, storage_path: str, cluster: ClusterConfig | None = None) -> Fitted:
    """Train on Ray from a materialized Ray Dataset with a uint8 `crop` column. `storage_path` (a local folder on one
    node, or s3://) holds Ray Train's checkpoint when Ray Train runs the fit."""
    cluster = cluster or ClusterConfig()
    rows = crops_ds.count()
    if not cluster.use_gpu and rows <= IN_MEMORY_ROWS:
        import ray

        task = ray.remote(fit_task).options(num_cpus=1, max_retries=cluster.max_failures)
        return ray.get(task.remote(cfg.model_dump(), *crops_ds.to_arrow_refs()))
    from preprocessing.dedup.model import fit_ray_train

    return _fitted(*fit_ray_train(crops_ds, cfg, storage_path, cluster, rows, IN_MEMORY_ROWS))


def fit_task(cfg: dict, *blocks) -> Fitted:
    """The CPU fit's Ray task (its epochs' progress lines carry its name)."""
    from preprocessing.dedup.model import fit_blocks

    return _fitted(*fit_blocks(cfg, *blocks))


def _fitted(state, losses: list[float]) -> Fitted:
    from preprocessing.dedup.model import state_file

    return Fitted({k: v.detach().cpu().numpy() for k, v in state.items()}, [float(v) for v in losses],
                  state_file(state))
