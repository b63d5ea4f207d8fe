"""The paper's hashing autoencoder (section 4.1): 3072-128-3072, ReLU code, denoising, dropout-regularised.

Inputs are 32x32 center crops of the dataset's images (`DedupConfig.crop`), flattened RGB. Training corrupts them with
Gaussian noise (`input_noise`) and drops code units (`dropout`) and asks for the clean crop back. The semantic hash
is the code layer binarised at ReLU > 0, i.e. the sign of the encoder's pre-activation. The saved model is exactly
that: Linear(3072, 128) -> ReLU -> Linear(128, 3072), a plain tensor dict.

A plain denoising AE gives a poor hash (measured with benchmarks/dedup_quality.py and tests/test_dedup.py): on MNIST
digits most units are dead or nearly constant (bits on for 0-96% of images) and distinct digits share one code
(pair precision 0.01), because reconstruction only cares about a few dominant directions. What makes the sign a good
hash, each kept because it measurably helped:
- Per-image standardisation (zero mean, unit RMS): brightness/contrast changes between copies do not move the code.
- Whitened low-frequency inputs: the encoder reads the crop through a fixed basis estimated on the dataset being
  de-duplicated, 2x2 average pooling then PCA, keeping the top `whiten` components scaled to unit variance (like
  pHash keeps low DCT frequencies). Pooling and the top components drop the high frequencies that JPEG and resizing
  disturb; whitening gives every kept direction equal say, so codes spread over all of them instead of the first few.
  The basis is folded into the encoder weights after training, so the saved model is still 3072-128-3072.
- A bit-balance and a decorrelation penalty on the code pre-activations (`balance`, `decorrelate`; computed on
  tanh(h / std(h)) over each batch): every unit is pushed to fire for half the images and independently of the
  others, the two properties that make a random pair of distinct images unlikely to share 128 bits. Measured: bits on
  for 46-58% of images, mean |correlation| 0.10, precision 1.0 on the test's MNIST+photos mix (was 0.01).
Tried and dropped: Gaussian noise on the code pre-activation (semantic hashing's trick: with a ReLU code the
network just scales the weights up, no gain); whitening without pooling or with 48-64 components (more chance
collisions, lower recall); a shift-consistency term with 1-2 px shifted copies (no recall gain on the benchmark, 2x
slower); more epochs (30 and 60 did not beat 10).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from preprocessing import storage
from preprocessing.config import ClusterConfig, DedupConfig
from preprocessing.progress import Progress
from preprocessing.dedup.semantic_hash import pack_bits

log = logging.getLogger(__name__)

EPS = 1e-3           # floor of the per-image RMS, so flat crops do not amplify noise
POOL = 2             # average pooling before the whitening PCA (32x32 crop -> 16x16)
EIG_FLOOR = 1e-4     # whitening divides by sqrt(max(eigenvalue, EIG_FLOOR * largest)): no blow-up on tiny datasets


# ------------------------------------------------------------------------------------------------------ inputs


def inputs_of(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, c, c, 3) uint8 crops -> (N, 3*c*c) float32, each row standardised (zero mean, unit RMS)."""
    if isinstance(crops, torch.Tensor):
        x = crops.reshape(len(crops), -1).float()
    else:  # a new float array: Ray's read-only buffers never reach torch
        x = torch.from_numpy(np.asarray(crops).reshape(len(crops), -1).astype(np.float32))
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(EPS * 255)


def pooling_matrix(crop: int, pool: int = POOL) -> torch.Tensor:
    """(3*(crop/pool)^2, 3*crop^2) float64: pool x pool average pooling of HWC-flattened crops, as a matrix."""
    if crop % pool:
        pool = 1
    side = crop // pool
    rows = ((np.arange(crop)[:, None] // pool) * side + np.arange(crop)[None, :] // pool)[..., None] * 3 + np.arange(3)
    m = torch.zeros(3 * side * side, 3 * crop * crop, dtype=torch.float64)
    m[torch.as_tensor(rows.reshape(-1)), torch.arange(3 * crop * crop)] = 1.0 / (pool * pool)
    return m


def pooled(x: torch.Tensor, crop: int) -> torch.Tensor:
    """(N, 3*crop*crop) HWC-flattened float -> float64 `x @ pooling_matrix(crop).T`, as sums of neighbours: the same
    values (a quarter of a float32 is exact in float64, and so are sums of four) without the matmul's 3,068 zero
    products for every pooled value; the whitening pass 1.77-1.84x faster at 200k crops (benchmarks/dedup_fit.py
    --in-process)."""
    x = x.double()
    if crop % POOL:
        return x
    n, half = len(x), crop // POOL
    w = x.reshape(n, crop, half, POOL * 3)           # each row's pixel pairs side by side
    w = (w[..., :3] + w[..., 3:]).reshape(n, half, POOL, half, 3)
    return (w[:, :, 0] + w[:, :, 1]).mul_(1.0 / (POOL * POOL)).reshape(n, -1)


class Moments:
    """Running sums of pooled, standardised inputs: what the whitening basis is estimated from (mergeable)."""

    def __init__(self, crop: int):
        self.crop, self.pool = crop, pooling_matrix(crop)
        d = self.pool.shape[0]
        self.n, self.sum, self.outer = torch.zeros((), dtype=torch.float64), torch.zeros(d, dtype=torch.float64), \
            torch.zeros(d, d, dtype=torch.float64)

    def add(self, crops) -> None:
        z = pooled(inputs_of(crops), self.crop)
        self.n += len(z)
        self.sum += z.sum(0)
        self.outer += z.T @ z

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.sum, self.outer]

    def basis(self, components: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(components, 3*c*c) float32 whitening basis on standardised inputs, and the input mean (3*c*c,)."""
        n = float(self.n)
        if n < 1:
            raise ValueError("no crops to estimate the whitening basis from")
        mean_z = self.sum / n
        cov = self.outer / n - torch.outer(mean_z, mean_z)
        values, vectors = torch.linalg.eigh(cov)
        k = min(components, len(values))
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        vectors = vectors * torch.where(vectors.sum(0) < 0, -1.0, 1.0)  # fixed eigenvector signs: deterministic
        scale = values.clamp_min(EIG_FLOOR * max(float(values[0]), 1e-12)).sqrt()
        basis = (vectors / scale).T @ self.pool
        center = self.pool.T @ (mean_z / self.pool.pow(2).sum(1))  # an input whose pooled image is the mean
        return basis.float(), center.float()


# ------------------------------------------------------------------------------------------------------ model


class HashAutoencoder(nn.Module):
    """inputs -> [fixed whitening basis] -> Linear -> ReLU code (code_bits) -> dropout -> Linear -> inputs.

    With a `basis` (k, inputs) the encoder is Linear(k, code_bits) on whitened inputs; `folded_state()` multiplies the
    basis into it, giving the plain Linear(inputs, code_bits) model that is saved and used for hashing.
    """

    def __init__(self, inputs: int, code_bits: int, dropout: float = 0.2, basis: torch.Tensor | None = None,
                 center: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("basis", basis)
        self.register_buffer("center", center if center is not None or basis is None else torch.zeros(inputs))
        self.register_buffer("noise_root", None if basis is None else _covariance_root(basis))
        self.encoder = nn.Linear(inputs if basis is None else len(basis), code_bits)
        self.decoder = nn.Linear(code_bits, inputs)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.encoder.bias)  # inputs are centred: every unit starts on about half the images

    @classmethod
    def from_config(cls, cfg: DedupConfig, basis: torch.Tensor | None = None, center: torch.Tensor | None = None
                    ) -> "HashAutoencoder":
        return cls(3 * cfg.crop * cfg.crop, cfg.code_bits, cfg.dropout, basis, center)

    def pre_code(self, x: torch.Tensor) -> torch.Tensor:
        if self.basis is not None:
            x = (x - self.center) @ self.basis.T
        return self.encoder(x)

    def forward(self, x: torch.Tensor, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, code pre-activation) of x read through Gaussian noise of std `noise` (the denoising
        corruption: the caller compares the reconstruction with the clean x).

        With a basis the encoder reads only the input's projection on it, and the projection of N(0, noise^2 I) is
        N(0, noise^2 B B^T): the same corruption is drawn in the basis's k dimensions, not in 3,072 (CPU epochs
        1.44-1.55x faster at 200k crops, benchmarks/dedup_fit.py --in-process)."""
        if not noise:
            h = self.pre_code(x)
        elif self.basis is None:
            h = self.pre_code(x + noise * torch.randn_like(x))
        else:
            drawn = torch.randn(len(x), len(self.basis), device=x.device, dtype=x.dtype)
            h = self.encoder(x @ self.basis.T - self.center @ self.basis.T + noise * drawn @ self.noise_root)
        return self.decoder(self.drop(torch.relu(h))), h

    @torch.no_grad()
    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """The semantic hash: code units with ReLU > 0."""
        return self.pre_code(x) > 0

    @torch.no_grad()
    def folded_state(self) -> dict[str, torch.Tensor]:
        """The 3072-128-3072 weights: the whitening basis multiplied into the encoder."""
        w, b = self.encoder.weight, self.encoder.bias
        if self.basis is not None:
            w = w @ self.basis
            b = b - w @ self.center
        return {"encoder.weight": w.detach().cpu().clone(), "encoder.bias": b.detach().cpu().clone(),
                "decoder.weight": self.decoder.weight.detach().cpu().clone(),
                "decoder.bias": self.decoder.bias.detach().cpu().clone()}


def _covariance_root(basis: torch.Tensor) -> torch.Tensor:
    """The symmetric square root R of B B^T (k x k): z R for z ~ N(0, I_k) is distributed as B e for e ~ N(0, I)."""
    b = basis.double()
    values, vectors = torch.linalg.eigh(b @ b.T)
    return ((vectors * values.clamp_min(0).sqrt()) @ vectors.T).to(basis.dtype)


def code_penalty(h: torch.Tensor, cfg: DedupConfig) -> torch.Tensor:
    """Bit balance (each unit on for half the batch) + decorrelation (units independent), on tanh(h / std(h))."""
    if len(h) < 2 or not (cfg.balance or cfg.decorrelate):
        return h.new_zeros(())
    t = torch.tanh(h / (h.std(0, correction=0, keepdim=True).detach() + 1e-6))
    penalty = cfg.balance * t.mean(0).pow(2).mean()
    if cfg.decorrelate:
        tc = t - t.mean(0)
        cov = tc.T @ tc / len(t)
        sd = cov.diag().clamp_min(1e-6).sqrt()
        corr = cov / sd[:, None] / sd[None, :]
        k = len(corr)
        penalty = penalty + cfg.decorrelate * (corr.pow(2).sum() - corr.diag().pow(2).sum()) / (k * (k - 1))
    return penalty


class Adam:
    """torch.optim.Adam's update as it runs on CPUs (its single-tensor path; no weight decay, no amsgrad), without
    torch.optim: the first call of a torch.optim optimizer's methods imports torch._dynamo, which every dedup's CPU
    fit task paid before its first step (its training phase is 0.5-0.9 s shorter without: benchmarks/startup.py).
    The same arithmetic in the same order, so the same weights to the bit on CPUs (tests/test_dedup.py compares the
    two). On a GPU torch's own runs (`train_epochs`): its multi-tensor kernels there are another order of operations,
    and Ray Train's start dwarfs the import."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = [q for q in params if q.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = [0] * len(self.params)  # per tensor, as torch counts them: only a tensor with a gradient steps
        self.exp_avg = [torch.zeros_like(q, memory_format=torch.preserve_format) for q in self.params]
        self.exp_avg_sq = [torch.zeros_like(q, memory_format=torch.preserve_format) for q in self.params]

    def zero_grad(self) -> None:
        for q in self.params:
            q.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, q in enumerate(self.params):
            if q.grad is None:
                continue
            grad, exp_avg, exp_avg_sq = q.grad, self.exp_avg[i], self.exp_avg_sq[i]
            self.steps[i] += 1
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            step = float(self.steps[i])  # torch keeps the count in a float tensor and reads it back
            step_size = self.lr / (1 - self.beta1 ** step)
            denom = (exp_avg_sq.sqrt() / (1 - self.beta2 ** step) ** 0.5).add_(self.eps)
            q.addcdiv_(exp_avg, denom, value=-step_size)


def train_epochs(model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], cfg: DedupConfig,
                 device: torch.device | str = "cpu", on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """The denoising objective (reconstruct each clean crop from its noisy copy) plus the code penalty.

    `batches()` yields uint8 crops. Returns the reconstruction loss per epoch.
    """
    cpu = torch.device(device).type == "cpu"
    opt = Adam(model.parameters(), lr=cfg.lr) if cpu else torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    model.train()
    for epoch in range(cfg.epochs):
        total, count = torch.zeros((), device=device), 0
        for crops in batches():
            x = inputs_of(crops).to(device, non_blocking=True)
            recon, h = model(x, cfg.input_noise)
            mse = nn.functional.mse_loss(recon, x)
            loss = mse + code_penalty(h, cfg)
            opt.zero_grad()  # torch's default too: set to None
            loss.backward()
            opt.step()
            total += mse.detach() * len(x)
            count += len(x)
        losses.append(float(total) / max(count, 1))  # one host sync per epoch
        if on_epoch:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def whitening(batches: Iterable[torch.Tensor], cfg: DedupConfig,
              reduce: Callable[[list[torch.Tensor]], None] | None = None) -> tuple[torch.Tensor | None, ...]:
    """The input basis for `cfg.whiten` components from one pass over the crops (None, None when whiten is 0).

    `reduce` sums the moments across data-parallel workers in place (all-reduce) so every rank gets the same basis.
    """
    if not cfg.whiten:
        return None, None
    moments = Moments(cfg.crop)
    for crops in batches:
        moments.add(crops)
    if reduce:
        reduce(moments.tensors())
    return moments.basis(cfg.whiten)


def fit_local(crops: np.ndarray, cfg: DedupConfig, on_epoch: Callable[[int, float], None] | None = None
              ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train in this process (a CPU fit's one task, small datasets, benchmarks); the same loop and seeds as a Ray Train
    worker that holds its crops in memory."""
    data = torch.as_tensor(crops)
    basis, center = whitening(chunks_of(data), cfg)
    torch.manual_seed(cfg.seed)
    model = HashAutoencoder.from_config(cfg, basis, center)
    losses = train_epochs(model, shuffled_batches(data, cfg), cfg, on_epoch=on_epoch)
    return model.folded_state(), losses


def chunks_of(data: torch.Tensor, size: int = 4096) -> Iterator[torch.Tensor]:
    return (data[i:i + size] for i in range(0, len(data), size))


def shuffled_batches(data: torch.Tensor, cfg: DedupConfig) -> Callable[[], Iterator[torch.Tensor]]:
    """Batches of crops held in memory, in a new seeded permutation each epoch (a full shuffle)."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            yield data[order[i:i + cfg.batch_size]]
    return batches


TRAIN_THREADS = 4  # torch threads of a CPU worker once its crops are in memory (Ray Data no longer needs the CPUs)


def fit_ray_train(crops_ds, cfg: DedupConfig, storage_path: str, cluster: ClusterConfig, rows: int,
                  in_memory_rows: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A fit on Ray Train (`fit.fit_ray`'s choice): DDP over `cluster.workers` GPUs, or one CPU worker. A worker whose
    share is at most `in_memory_rows` crops (`fit.IN_MEMORY_ROWS`) reads it once and trains on it in memory."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, RunConfig

    from preprocessing import ray_train

    if not cluster.use_gpu:
        cluster = cluster.model_copy(update={"workers": 1})
    trainer = ray_train.Trainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump(), "rows": rows, "in_memory_rows": in_memory_rows},
        scaling_config=ray_train.scaling(cluster, cpus_per_worker=None if cluster.use_gpu else 0.5),
        datasets={"train": crops_ds.select_columns(["crop"])},
        run_config=RunConfig(name="dedup-autoencoder", storage_path=storage_path,
                             failure_config=ray_train.failures(cluster)),
        # stream order as given (and no ExecutionOptions.exclude_resources, which Ray Train's default still sets)
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = ray_train.fit(trainer)
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/model.pt", map_location="cpu", weights_only=True)
    losses = [float(v) for v in result.metrics["losses"]]
    return state, losses


def fit_blocks(cfg: dict, *blocks) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A CPU fit (`fit.fit_task` runs it as one Ray task): the training crops (Ray Data blocks with a `crop` column,
    in order) -> `fit_local`, its epochs shown as a Ray Train worker's are (through Ray's log forwarding)."""
    from preprocessing.dedup.exchange import as_batch

    dcfg = DedupConfig(**cfg)
    parts = [batch["crop"] for batch in map(as_batch, blocks) if batch]
    crops = np.concatenate(parts) if parts else np.zeros((0, dcfg.crop, dcfg.crop, 3), np.uint8)
    shown = Progress("dedup-train", dcfg.epochs, "epochs", stream=sys.stderr, bar=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(TRAIN_THREADS, os.cpu_count() or 1)))
    try:
        state, losses = fit_local(crops, dcfg, on_epoch=lambda epoch, loss: shown.update(
            epoch + 1, note=f"reconstruction loss {loss:.4f}"))
    finally:  # Ray runs later tasks (the encode's, one thread each) in this same worker process
        torch.set_num_threads(threads)
    shown.close()
    return state, losses


def _train_worker(config: dict) -> None:
    """Ray Train loop: one pass for the whitening basis (all-reduced), then the epochs; rank 0 reports the weights."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = DedupConfig(**config["cfg"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")

    def batches(shuffle: bool = True):
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, dtypes=torch.uint8,
                                              **({"local_shuffle_buffer_size": cfg.batch_size * 8,
                                                  "local_shuffle_seed": cfg.seed} if shuffle else {})):
            yield batch["crop"]

    def all_reduce(tensors: list[torch.Tensor]) -> None:
        if ctx.get_world_size() > 1:
            for t in tensors:
                moved = t.to(device)
                dist.all_reduce(moved)
                t.copy_(moved.cpu())

    share = -(-config["rows"] // ctx.get_world_size())  # Ray Train splits the rows equally
    if share <= config["in_memory_rows"]:
        # One pass reads this worker's crops; the epochs then shuffle them in memory, like `fit_local`: streaming
        # them again every epoch through Ray Data cost more than the training itself (~2x on 2 CPUs at 100k).
        data = torch.cat(list(batches(shuffle=False)))
        if device.type == "cpu":
            torch.set_num_threads(max(1, min(TRAIN_THREADS, os.cpu_count() or 1)))
        basis, center = whitening(chunks_of(data), cfg, all_reduce)
        batches = shuffled_batches(data, cfg)
    else:
        basis, center = whitening(batches(shuffle=False), cfg, all_reduce)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    net = HashAutoencoder.from_config(cfg, basis, center)
    model = ray.train.torch.prepare_model(net)
    shown = Progress("dedup-train", cfg.epochs, "epochs", stream=sys.stderr, bar=False,
                     show=ctx.get_world_rank() == 0)  # rank 0's lines reach the driver through Ray's log forwarding
    losses = train_epochs(model, batches, cfg, device,
                          on_epoch=lambda epoch, loss: shown.update(epoch + 1, note=f"reconstruction loss {loss:.4f}"))
    shown.close()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            torch.save(net.folded_state(), f"{d}/model.pt")
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"losses": losses}, checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------------------ codes


def code_scores(state: dict[str, torch.Tensor] | HashAutoencoder, crops: np.ndarray, batch: int = 8192
                ) -> Iterator[torch.Tensor]:
    """uint8 crops (N, c, c, 3) -> the code layer's pre-activations, one (<= batch, code_bits) tensor per batch, from a
    model or from saved weights (only the folded encoder): the bits are those > 0 (`encode`), the ones nearest 0 the
    least certain (`views.least_certain`)."""
    score = state.pre_code if isinstance(state, nn.Module) else functools.partial(  # HashAutoencoder.pre_code, folded
        nn.functional.linear, weight=state["encoder.weight"], bias=state["encoder.bias"])
    for i in range(0, len(crops), batch):
        with torch.no_grad():  # not held across the yield: the caller's grad mode stays its own
            z = score(inputs_of(crops[i:i + batch]))
        yield z


def encode(state: dict[str, torch.Tensor] | HashAutoencoder, crops: np.ndarray, cfg: DedupConfig,
           batch: int = 8192) -> np.ndarray:
    """uint8 crops (N, c, c, 3) -> packed codes (N, code_bits/8) uint8, most significant bit = unit 0.

    Given saved weights, only the (folded) encoder is needed: no module is built, so per-batch callers stay cheap.
    """
    out = [pack_bits((z > 0).numpy()) for z in code_scores(state, crops, batch)]
    return np.concatenate(out) if out else np.zeros((0, (cfg.code_bits + 7) // 8), np.uint8)


def state_file(state: dict[str, torch.Tensor]) -> bytes:
    """Weights as a plain tensor dict: `torch.load(..., weights_only=True)` reads it back, no pickle of code."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buf)
    return buf.getvalue()


def save_state(state: dict[str, torch.Tensor], uri: str) -> None:
    storage.write_bytes(uri, state_file(state))


def load_state(uri: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
