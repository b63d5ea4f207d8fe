"""The paper's hashing autoencoder (section 4.1): 3072-128-3072, ReLU code, denoising, dropout-regularised.

Inputs are 32x32 center crops of the dataset's images (`DedupConfig.crop`), flattened RGB. Training corrupts them with
Gaussian noise (`input_noise`) and drops code units (`dropout`) and asks for the clean crop back. The semantic hash
is the code layer binarised at ReLU > 0, i.e. the sign of the encoder's pre-activation.

What makes that sign a good hash (measured with benchmarks/dedup_quality.py, not assumed):
- Each crop is standardised (zero mean, unit RMS per image) before the network sees it, so brightness and contrast
  changes, common between copies of one photo, do not move the code at all.
- Gaussian noise of std `CODE_NOISE` is added to the pre-activation during training (semantic hashing, Salakhutdinov
  & Hinton 2009): the decoder only reads codes that survive it, so the encoder learns pre-activations far from 0,
  and the small input changes of a re-encoded or re-cropped copy rarely flip a bit.
- Encoder biases start at 0 (and inputs are centred), so every unit starts on about half the images: a code bit is
  informative from step one instead of being a dead, always-0 unit.
"""

from __future__ import annotations

import io
import logging
from typing import Callable, Iterable

import cv2
import numpy as np
import torch
from torch import nn

from preprocessing import storage
from preprocessing.config import DedupConfig
from preprocessing.semantic_hash import pack_bits

log = logging.getLogger(__name__)

CODE_NOISE = 1.0     # std of the noise on the code pre-activation during training (0 turns the trick off)
EPS = 1e-3           # floor of the per-image RMS, so flat crops do not amplify noise


# ------------------------------------------------------------------------------------------------------ inputs


def crops_of(images: np.ndarray, crop: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, crop, crop, 3) uint8: the largest center square, area-downsampled to crop x crop."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    n, h, w, _ = images.shape
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    out = np.empty((n, crop, crop, 3), np.uint8)
    for i in range(n):
        out[i] = cv2.resize(images[i, y:y + side, x:x + side], (crop, crop), interpolation=cv2.INTER_AREA)
    return out


def inputs_of(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, c, c, 3) uint8 crops -> (N, 3*c*c) float32, each row standardised (zero mean, unit RMS)."""
    x = torch.as_tensor(np.asarray(crops) if not isinstance(crops, torch.Tensor) else crops)
    x = x.reshape(len(x), -1).float()
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(EPS * 255)


# ------------------------------------------------------------------------------------------------------ model


class HashAutoencoder(nn.Module):
    """inputs -> Linear -> ReLU code (code_bits) -> Linear -> inputs, with dropout on the code."""

    def __init__(self, inputs: int, code_bits: int, dropout: float = 0.2, code_noise: float = CODE_NOISE):
        super().__init__()
        self.encoder = nn.Linear(inputs, code_bits)
        self.decoder = nn.Linear(code_bits, inputs)
        self.drop = nn.Dropout(dropout)
        self.code_noise = code_noise
        nn.init.zeros_(self.encoder.bias)

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> "HashAutoencoder":
        return cls(3 * cfg.crop * cfg.crop, cfg.code_bits, cfg.dropout)

    def pre_code(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_code(x)
        if self.training and self.code_noise:
            h = h + self.code_noise * torch.randn_like(h)
        return self.decoder(self.drop(torch.relu(h)))

    @torch.no_grad()
    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """The semantic hash: code units with ReLU > 0."""
        return self.pre_code(x) > 0


def train_epochs(model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], cfg: DedupConfig,
                 device: torch.device | str = "cpu", on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """The denoising objective: reconstruct each clean crop from its noisy copy. `batches()` yields uint8 crops."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    model.train()
    for epoch in range(cfg.epochs):
        total, count = torch.zeros((), device=device), 0
        for crops in batches():
            x = inputs_of(crops).to(device, non_blocking=True)
            noisy = x + cfg.input_noise * torch.randn_like(x) if cfg.input_noise else x
            loss = nn.functional.mse_loss(model(noisy), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(x)
            count += len(x)
        losses.append(float(total) / max(count, 1))  # one host sync per epoch
        if on_epoch:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def fit_local(crops: np.ndarray, cfg: DedupConfig) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train in this process (small datasets, benchmarks); same loop and seeds as the Ray Train path."""
    torch.manual_seed(cfg.seed)
    model = HashAutoencoder.from_config(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.as_tensor(crops)

    def batches():
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            yield data[order[i:i + cfg.batch_size]]

    losses = train_epochs(model, batches, cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def fit_ray(crops_ds, cfg: DedupConfig, storage_path: str, num_workers: int | None = None
            ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train on Ray Train (DDP) from a Ray Dataset with a uint8 `crop` column; returns (state_dict, epoch losses).

    One worker per GPU when the cluster has GPUs; otherwise one CPU worker with half a CPU (the model is tiny, and Ray
    Data needs the rest to stream crops). `storage_path` (local dir on one node, or s3://) holds the checkpoint.
    """
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0
    workers = num_workers or (gpus if use_gpu else 1)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 0.5}),
        datasets={"train": crops_ds.select_columns(["crop"])},
        run_config=RunConfig(name="dedup-autoencoder", storage_path=storage_path),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"autoencoder training failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/model.pt", map_location="cpu", weights_only=True)
    losses = [float(v) for v in result.metrics["losses"]]
    return state, losses


def _train_worker(config: dict) -> None:
    """Ray Train loop: each worker streams its share of the crops; rank 0 reports the weights once, at the end."""
    import tempfile

    import ray.train
    import ray.train.torch

    cfg = DedupConfig(**config["cfg"])
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(HashAutoencoder.from_config(cfg))
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")

    def batches():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.batch_size * 8,
                                              local_shuffle_seed=cfg.seed, dtypes=torch.uint8):
            yield batch["crop"]

    losses = train_epochs(model, batches, cfg, device)
    net = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, f"{d}/model.pt")
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"losses": losses}, checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------------------ codes


def model_from_state(state: dict[str, torch.Tensor], cfg: DedupConfig) -> HashAutoencoder:
    model = HashAutoencoder.from_config(cfg)
    model.load_state_dict(state)
    return model.eval()


def encode(state: dict[str, torch.Tensor] | HashAutoencoder, crops: np.ndarray, cfg: DedupConfig,
           batch: int = 8192) -> np.ndarray:
    """uint8 crops (N, c, c, 3) -> packed codes (N, code_bits/8) uint8, most significant bit = unit 0."""
    model = state if isinstance(state, nn.Module) else model_from_state(state, cfg)
    out = [pack_bits(model.bits(inputs_of(crops[i:i + batch])).numpy()) for i in range(0, len(crops), batch)]
    return np.concatenate(out) if out else np.zeros((0, (cfg.code_bits + 7) // 8), np.uint8)


def save_state(state: dict[str, torch.Tensor], uri: str) -> None:
    """Weights as a plain tensor dict: `torch.load(..., weights_only=True)` reads it back, no pickle of code."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_state(uri: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
