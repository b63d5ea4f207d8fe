"""Sample quality of our trainer vs. a plain loop written the way pytorch/examples/dcgan trains, on the demo's digits.

Both train on the demo's 4,000 MNIST digits (32x32, as configs/demo-mnist-32.yaml's dataset holds
them), with the same batches in the same order, for the same number of steps, at the demo config's widths and
optimiser. Ours is the step the Ray Train loop runs (dcgan.networks + dcgan.step.GANStep, seeded as the worker seeds
it); the reference is pytorch/examples/dcgan's main.py: its own nn.Sequential networks (ConvTranspose from a 1x1 z,
conv to one sigmoid output), N(0, 0.02) init, z ~ N(0, 1), BCELoss, D on a real then a fake batch, then G. Both are
sampled with batch statistics (as the authors and pytorch/examples sample); the two train side by side in two
processes (one thread each), since the figure, not the time, is compared. The figure is the digit classifier's
(dcgan.evaluation.digits): digit FD against the 1,000 held-out digits (lower is better) and the confident share;
the ratio ours/reference of the FD is <= 1 when ours is at least as good.

    python benchmarks/sample_quality.py                       # the demo's model, 2400 steps (~5 min on 2 cores)
    python benchmarks/sample_quality.py --steps 1200 --eval-every 300 --only ours --width 64   # how width and
                                                              # steps move the figure (for the demo's config)
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcgan.config import load_config
from dcgan.evaluation import digits
from dcgan.networks import Discriminator, Generator, sample_z
from dcgan.sampling import generate, save_grid, to_uint8
from dcgan.step import GANStep, StepOptions, make_optimizers

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo-mnist-32.yaml"
N_SAMPLES = 1000


def batches(images: np.ndarray, batch: int, steps: int, seed: int):
    """uint8 NHWC batches, a fresh seeded permutation every epoch (the last partial batch dropped)."""
    gen, step = torch.Generator().manual_seed(seed), 0
    while True:
        order = torch.randperm(len(images), generator=gen).numpy()
        for i in range(0, len(order) - batch + 1, batch):
            if step == steps:
                return
            yield torch.from_numpy(images[order[i : i + batch]])
            step += 1


@dataclass
class Checks:
    """When to measure the figures (every `every` steps and at the last), and where to save sample grids."""

    steps: int
    every: int
    grids: str | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def measure(self, g: nn.Module, z: torch.Tensor, name: str, step: int) -> dict:
        images = to_uint8(generate(g, z))  # batch statistics, as the authors and pytorch/examples sample
        if self.grids:
            save_grid(images[:64], str(Path(self.grids) / f"{name}-{step:05d}.png"))
        q = digits.digit_quality(images)
        print(f"{name:9s} step {step:5d}: digit FD {q['digit_fd']:7.1f}  confident share "
              f"{q['confident_share']:.3f}  classes {q['classes_covered']}/10", flush=True)
        return q


# ------------------------------------------------------------------------------------------------- the reference


def reference_nets(nz: int, ngf: int, ndf: int, nc: int) -> tuple[nn.Module, nn.Module]:
    """pytorch/examples/dcgan's Generator and Discriminator, one stage fewer for 32x32 (same widths as ours)."""
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def weights_init(m):
        name = m.__class__.__name__
        if name.find("Conv") != -1:
            nn.init.normal_(m.weight.data, 0.0, 0.02)
        elif name.find("BatchNorm") != -1:
            nn.init.normal_(m.weight.data, 1.0, 0.02)
            nn.init.constant_(m.bias.data, 0)

    g.apply(weights_init)
    d.apply(weights_init)
    return g, d


def train_reference(cfg, data, steps: int, seed: int, checks: Checks) -> list[tuple[int, dict]]:
    """pytorch/examples/dcgan main.py's loop (labels 1/0, BCELoss, real then fake D backward, then G)."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(seed)
    g, d = reference_nets(m.z_dim, m.ngf, m.ndf, m.channels)
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(d.parameters(), lr=t.lr, betas=(t.beta1, 0.999))
    opt_g = torch.optim.Adam(g.parameters(), lr=t.lr, betas=(t.beta1, 0.999))
    fixed = torch.randn(N_SAMPLES, m.z_dim, 1, 1, generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for i, batch in enumerate(batches(data, t.batch_size, steps, seed), 1):
        real = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
        b = real.size(0)
        d.zero_grad()
        label = torch.full((b,), 1.0)
        err_real = criterion(d(real).view(-1), label)
        err_real.backward()
        fake = g(torch.randn(b, m.z_dim, 1, 1))
        label.fill_(0.0)
        err_fake = criterion(d(fake.detach()).view(-1), label)
        err_fake.backward()
        opt_d.step()
        g.zero_grad()
        label.fill_(1.0)
        err_g = criterion(d(fake).view(-1), label)
        err_g.backward()
        opt_g.step()
        if checks.due(i):
            out.append((i, checks.measure(g, fixed, "reference", i)))
    return out


# ------------------------------------------------------------------------------------------------------- ours


def train_ours(cfg, data, steps: int, seed: int, checks: Checks) -> list[tuple[int, dict]]:
    """The Ray Train worker's step on one CPU worker: seeded weights, make_optimizers, GANStep on uint8 batches."""
    device = torch.device("cpu")
    train = cfg.train.model_copy(update={"seed": seed})
    torch.manual_seed(seed)
    g, d = Generator(cfg.model), Discriminator(cfg.model)
    options = StepOptions.resolve(train, device)
    opt_g, opt_d = make_optimizers(g, d, train, fused=options.fused_adam)
    gan = GANStep(g, d, opt_g, opt_d, cfg.model, train, device, options)
    fixed = sample_z(cfg.model, N_SAMPLES, generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for i, batch in enumerate(batches(data, train.batch_size, steps, seed), 1):
        gan(batch)
        if checks.due(i):
            out.append((i, checks.measure(g, fixed, "ours", i)))
    return out


def _train(name: str, cfg, steps: int, seed: int, checks: Checks, threads: int) -> tuple[list, float]:
    """One trainer in its own process: (figures at each check, seconds)."""
    torch.set_num_threads(threads)
    data, _ = digits.mnist_rgb32(digits.demo_indices())
    fn = train_ours if name == "ours" else train_reference
    t0 = time.perf_counter()
    out = fn(cfg, data[..., : cfg.model.channels], steps, seed, checks)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEMO), help="experiment config for the model and optimiser (the demo's)")
    p.add_argument("--steps", type=int, default=2400, help="training steps of each trainer (default 2400: 60%% of the "
                   "demo's, where both draw digits; ~5 min on 2 cores)")
    p.add_argument("--eval-every", type=int, default=0, help="also print the figures every N steps")
    p.add_argument("--width", type=int, help="ngf = ndf (default: the config's)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the config's)")
    p.add_argument("--batch", type=int, help="batch size (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["ours", "reference"], help="train one of the two")
    p.add_argument("--grids", help="folder for a grid of 64 samples at each evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trainer (1: small convs, 2 trainers "
                   "side by side in two processes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.width:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"ngf": args.width, "ndf": args.width})})
    train = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch), ("steps", args.steps)) if v}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    steps = cfg.train.steps
    data, _ = digits.mnist_rgb32(digits.demo_indices())
    t0 = time.perf_counter()
    floor = digits.digit_quality(data[:N_SAMPLES, :, :, : cfg.model.channels])
    print(f"data: {len(data)} demo digits; model ngf={cfg.model.ngf} ndf={cfg.model.ndf}, batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr}, {steps} steps, seed {args.seed}; classifier ready in {time.perf_counter() - t0:.0f} s")
    print(f"real training digits (the floor): digit FD {floor['digit_fd']:.1f}, "
          f"confident share {floor['confident_share']:.3f}", flush=True)
    checks = Checks(steps, args.eval_every or steps, args.grids)
    if args.grids:
        Path(args.grids).mkdir(parents=True, exist_ok=True)
    names = [n for n in ("reference", "ours") if not args.only or args.only == n]
    with ProcessPoolExecutor(len(names), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {n: pool.submit(_train, n, cfg, steps, args.seed, checks, args.threads) for n in names}
        results = {n: j.result() for n, j in jobs.items()}
    for name, (_, secs) in results.items():
        print(f"{name:9s} trained in {secs:.0f} s ({steps * cfg.train.batch_size / secs:.0f} img/s incl. checks)")
    if len(results) == 2:
        r, o = results["reference"][0][-1][1], results["ours"][0][-1][1]
        print(f"ratio ours/reference at step {steps}: digit FD {o['digit_fd'] / r['digit_fd']:.2f}x "
              f"(<= 1: ours at least as good), confident share "
              f"{o['confident_share'] / max(r['confident_share'], 1e-9):.2f}x (>= 1: ours at least as good)")


if __name__ == "__main__":
    main()
