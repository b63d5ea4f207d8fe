"""Our DCGAN training step vs. a plain fp32 eager loop written the way pytorch/examples/dcgan trains.

Both train the same networks on the same batches in the same process; the baseline follows pytorch/examples: Sigmoid +
BCELoss, two D backward passes, new label tensors, `.item()` host syncs and a log line every step, float inputs
prepared beforehand. Ours takes uint8 NHWC batches (as the shards deliver them) and converts on the device, keeps
metrics on the device, skips D weight gradients in the G update, and on a GPU adds bf16 autocast, channels_last,
torch.compile and fused Adam. Prints images/s for both and the ratio. The variants are timed in interleaved
rounds (each round times every one once) so that a shared machine's load falls on all of them alike.

    python benchmarks/train_step.py                 # CPU: a 32x32 half-width model, batch 64
    python benchmarks/train_step.py --variants      # + each option on its own: bf16 autocast (AMX on CPU),
                                                    #   channels_last, fused Adam, torch.compile; GPU-only rows
    python benchmarks/train_step.py --paper         # the paper's 64x64 model (ngf=ndf=128), batch 128 (GPU)
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from contextlib import redirect_stdout

import torch
from torch import nn

from dcgan.config import ModelConfig, TrainConfig
from dcgan.networks import Discriminator, Generator
from dcgan.step import GANStep, StepOptions, make_optimizers


def baseline_loop(g, d, opt_g, opt_d, batches, nz, device):
    """pytorch/examples/dcgan main.py's inner loop, verbatim in spirit."""
    criterion = nn.BCELoss()
    net_d = nn.Sequential(d, nn.Sigmoid())
    real_label, fake_label = 1.0, 0.0
    log = io.StringIO()
    for i, real_cpu in enumerate(batches):
        net_d.zero_grad()
        real = real_cpu.to(device)
        b = real.size(0)
        label = torch.full((b,), real_label, dtype=real.dtype, device=device)
        output = net_d(real).view(-1)
        err_d_real = criterion(output, label)
        err_d_real.backward()
        d_x = output.mean().item()
        noise = torch.randn(b, nz, device=device)
        fake = g(noise)
        label.fill_(fake_label)
        output = net_d(fake.detach()).view(-1)
        err_d_fake = criterion(output, label)
        err_d_fake.backward()
        d_g_z1 = output.mean().item()
        err_d = err_d_real + err_d_fake
        opt_d.step()
        g.zero_grad()
        label.fill_(real_label)
        output = net_d(fake).view(-1)
        err_g = criterion(output, label)
        err_g.backward()
        d_g_z2 = output.mean().item()
        opt_g.step()
        with redirect_stdout(log):
            print(f"[{i}] Loss_D: {err_d.item():.4f} Loss_G: {err_g.item():.4f} D(x): {d_x:.4f} "
                  f"D(G(z)): {d_g_z1:.4f} / {d_g_z2:.4f}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, batches, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn(batches)
    sync(device)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", action="store_true", help="paper model: 64x64, ngf=ndf=128, batch 128")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--width", type=int, default=64, help="ngf = ndf")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each times every variant once, interleaved")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", action="store_true", help="also time each optimisation on its own")
    args = ap.parse_args(argv)
    if args.paper:
        args.resolution, args.width, args.batch = 64, 128, 128
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mcfg = ModelConfig(resolution=args.resolution, ngf=args.width, ndf=args.width)
    tcfg = TrainConfig(batch_size=args.batch)
    gen = torch.Generator().manual_seed(0)
    uint8 = [torch.randint(0, 256, (args.batch, args.resolution, args.resolution, 3), dtype=torch.uint8, generator=gen)
             for _ in range(args.warmup + 3 + args.steps)]
    if device.type == "cuda":
        uint8 = [b.pin_memory() for b in uint8]
    floats = [b.permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous() for b in uint8]

    def fresh():
        torch.manual_seed(0)
        return Generator(mcfg), Discriminator(mcfg)

    def baseline():
        g, d = (m.to(device) for m in fresh())
        opt_g, opt_d = make_optimizers(g, d, tcfg)
        return lambda bs: baseline_loop(g, d, opt_g, opt_d, bs, mcfg.z_dim, device)

    def ours(options: StepOptions):
        g, d = fresh()
        opt_g, opt_d = make_optimizers(g, d, tcfg, fused=options.fused_adam)
        step = GANStep(g, d, opt_g, opt_d, mcfg, tcfg, device, options)

        def run(bs):
            acc = torch.zeros(4, device=device)
            for b in bs:
                acc += step(b)
            return acc
        return run

    variants = {"ours": StepOptions.resolve(tcfg, device)}
    gpu_rows = {  # what `precision: auto` etc. resolve to on a GPU, with and without compile
        "ours + bf16 + channels_last + fused (GPU)": StepOptions(bf16=True, channels_last=True, fused_adam=True),
        "ours + all GPU options incl. compile (GPU)": StepOptions(bf16=True, channels_last=True, compile=True,
                                                                fused_adam=True),
    }
    if args.variants:
        variants.update({
            "ours fp32 eager (no device extras)": StepOptions(),
            "ours + bf16 autocast": StepOptions(bf16=True),
            "ours + channels_last": StepOptions(channels_last=True),
            "ours + fused Adam": StepOptions(fused_adam=True),
            "ours + torch.compile": StepOptions(compile=True),
        })
        if device.type == "cuda":
            variants.update(gpu_rows)
    base_name = "baseline (pytorch/examples style, fp32 eager)"
    runs = {base_name: (baseline(), floats)} | {name: (ours(o), uint8) for name, o in variants.items()}
    for name, (fn, data) in runs.items():  # warm-up (and torch.compile's compilation) outside the timing
        fn(data[: args.warmup + (3 if variants.get(name, StepOptions()).compile else 0)])
    # Interleaved rounds: on a shared machine every variant sees the same load; the best round is the least disturbed.
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (fn, data) in runs.items():
            rates[name].append(args.steps * args.batch / seconds(fn, data[-args.steps :], device))

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, model {args.resolution}px ngf=ndf={args.width}, batch {args.batch}, "
          f"{args.rounds} interleaved rounds of {args.steps} timed steps: best round; in brackets the median over "
          f"rounds of the ratio to the baseline in the same round")
    base = max(rates[base_name])
    print(f"{base_name:<45} {base:9.1f} images/s")
    for name, opts in variants.items():
        ips = max(rates[name])
        same_round = statistics.median(r / b for r, b in zip(rates[name], rates[base_name]))
        print(f"{name:<45} {ips:9.1f} images/s   ratio vs baseline {ips / base:5.2f}x ({same_round:5.2f}x)   {opts}")
    if args.variants and device.type != "cuda":
        why = "no GPU" if not torch.cuda.is_available() else f"--device {device}"
        for name in gpu_rows:
            print(f"{name:<45} not measured: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
