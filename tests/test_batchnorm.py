"""Cross-replica BatchNorm: exactly nn.BatchNorm2d in one process; over 2 gloo processes, one BatchNorm2d over the
concatenated batch, and a GAN step on 2 workers equal to the step on 1 worker at the same global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dcgan.batchnorm import CrossReplicaBatchNorm2d, convert_batchnorm, local_statistics
from dcgan.config import ModelConfig, TrainConfig
from dcgan.networks import Discriminator, Generator
from dcgan.sampling import generate
from dcgan.step import GANStep, StepOptions, make_optimizers
from tests.conftest import free_port
from tests.realdata import mnist_rgb32
from preprocessing import dataset_layout

# A process's first torch.tanh on CPU with more than one thread can be a less exact one (up to 9e-5 relative off
# float64 where later calls are 3e-8; 5 of 12 fresh processes with 2 threads, none with 1; torch 2.13 on this box):
# samples drawn in two processes, or first and later in one, agree to this, not bit for bit.
FIRST_TANH = dict(rtol=2e-4, atol=1e-6)
MODEL = ModelConfig(resolution=32, ngf=8, ndf=8, z_dim=16, kernel_size=4)
BATCH, STEPS = 16, 3


def bn_pair(momentum=0.1):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, momentum=momentum)
    nn.init.normal_(ref.weight, 1.0, 0.3)
    nn.init.normal_(ref.bias, 0.0, 0.3)
    ours = convert_batchnorm(nn.BatchNorm2d(6, momentum=momentum))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def batch_and_weights(n=BATCH):
    """A batch whose channels are not centred, and weights that make the backward pass non-trivial."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, 5, 5, generator=gen) * 2 + 1, torch.randn(n, 6, 5, 5, generator=gen)


def forward_backward(bn, x, w):
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * w).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("momentum", [0.1, None])
def test_identical_to_batchnorm2d_without_distributed(momentum):
    ref, ours = bn_pair(momentum)
    assert isinstance(ours, CrossReplicaBatchNorm2d)
    for i in range(2):
        x, w = torch.randn(8, 6, 5, 5) * 2 + 1, torch.randn(8, 6, 5, 5)
        for a, b in zip(forward_backward(ref, x, w), forward_backward(ours, x, w)):
            assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))
    assert torch.equal(ref.weight.grad, ours.weight.grad) and torch.equal(ref.bias.grad, ours.bias.grad)
    ref.eval(), ours.eval()
    assert torch.equal(ref(x), ours(x))


def test_conversion_keeps_parameters_and_checkpoint_keys():
    g = Generator(MODEL)
    params, keys = list(g.parameters()), list(g.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    convert_batchnorm(g)
    assert sum(isinstance(m, CrossReplicaBatchNorm2d) for m in g.modules()) == n_bn == 3
    assert all(a is b for a, b in zip(params, g.parameters())) and list(g.state_dict()) == keys
    plain = Generator(MODEL)
    plain.load_state_dict(g.state_dict())  # a checkpoint of a distributed run loads into the plain network
    z = torch.rand(8, MODEL.z_dim)
    torch.testing.assert_close(generate(g, z), generate(plain, z), **FIRST_TANH)


def _worker(rank: int, world: int, port: int, out_dir: str, real: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        # The module: this rank's slice of one batch, gradients of weight and bias summed as the step does.
        _, bn = bn_pair()
        x, w = batch_and_weights()
        y, gx = forward_backward(bn, x[part], w[part])
        for p in bn.parameters():
            dist.all_reduce(p.grad)
        # A sample grid drawn by rank 0 alone must not wait for rank 1.
        if rank == 0:
            torch.manual_seed(3)
            g = convert_batchnorm(Generator(MODEL))
            with local_statistics(g):
                grid = generate(g, torch.rand(8, MODEL.z_dim, generator=torch.Generator().manual_seed(2)))
        else:
            grid = None
        torch.save({"y": y, "gx": gx, "bn": bn.state_dict(), "grads": [p.grad for p in bn.parameters()],
                    "grid": grid, "gan": gan_steps(real, rank, world)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def gan_steps(real: torch.Tensor, rank: int, world: int) -> dict[str, torch.Tensor]:
    """G and D after STEPS GAN steps on this rank's slice of a fixed global batch of real digits, in float64 so
    that only the algorithm can differ, not float32 rounding (see the Ray test below for why that matters)."""
    train = TrainConfig(batch_size=BATCH)
    torch.manual_seed(0)
    g, d = Generator(MODEL).double(), Discriminator(MODEL).double()
    opt_g, opt_d = make_optimizers(g, d, train)
    step = GANStep(g, d, opt_g, opt_d, MODEL, train, torch.device("cpu"), StepOptions(), distributed=world > 1)
    n = BATCH // world
    for _ in range(STEPS):
        step(real[rank * n : (rank + 1) * n])
    return {f"g.{k}": v for k, v in g.state_dict().items()} | {f"d.{k}": v for k, v in d.state_dict().items()}


def test_two_gloo_processes_equal_one_batchnorm_and_one_worker(tmp_path):
    real = torch.from_numpy(mnist_rgb32(BATCH)).permute(0, 3, 1, 2).double() / 127.5 - 1
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), real), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    ref, _ = bn_pair()
    x, w = batch_and_weights()
    y, gx = forward_backward(ref, x, w)
    half = BATCH // 2
    close = dict(rtol=0, atol=1e-5)  # float32: sum/sum of squares vs nn.BatchNorm2d's own reduction order
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y, **close)
    torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), gx, **close)
    torch.testing.assert_close(r0["grads"], [ref.weight.grad, ref.bias.grad], **close)
    torch.testing.assert_close(dict(r0["bn"]), dict(ref.state_dict()), **close)
    assert all(torch.equal(r0["bn"][k], r1["bn"][k]) for k in r0["bn"])  # running statistics identical on all ranks
    assert not torch.allclose(r0["y"], bn_pair()[0](x[:half]), atol=1e-3)  # not this rank's own statistics

    torch.manual_seed(3)
    g = convert_batchnorm(Generator(MODEL))
    z = torch.rand(8, MODEL.z_dim, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(r0["grid"], generate(g, z), **FIRST_TANH)  # rank 0 alone drew it, not waiting

    one = gan_steps(real, 0, 1)
    assert all(torch.equal(r0["gan"][k], r1["gan"][k]) for k in one)  # the ranks stay identical
    worst = max((r0["gan"][k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-9, worst  # 2 workers == 1 worker at the same global batch, up to float64 rounding


@pytest.mark.slow
def test_two_workers_train_as_one_worker(ray_cluster, tmp_path):
    """Through `dcgan.train.train` on Ray: a dataset of exactly one global batch of 32 real digits, 3 steps, 1 worker
    vs 2 workers: every weight and BatchNorm buffer of G and D within 1e-9, in float64 (train.precision fp64).

    Why float64: 2 workers sum the same numbers in another order, so float32 gradients differ by rounding (~3e-6 here).
    Adam's first update is lr * g / (|g| + eps), which amplifies rounding by lr / eps = 2e4 where |g| is near eps
    (one element of G's first conv gets 5.7e-9): in float32, the same 2-worker and 1-worker steps on these very rows
    (gloo, no Ray) end 3.8e-4 apart after 3 steps on this CPU, with either BatchNorm backward. Whether 1e-4 held in
    float32 depended on the row order and the CPU's kernels; float64 leaves only a real difference visible.
    tests/test_train_stream.py runs the same check over 24 steps, 9 shards, shuffle on, kills and resizes."""
    from dcgan import checkpoints
    from dcgan.config import load_config
    from dcgan.train import train
    from preprocessing import shards

    data = str(tmp_path / "data")
    entry = shards.write_table(data, dataset_layout.part(0),
                               shards.make_table([f"d{j:05d}" for j in range(32)], mnist_rgb32(32)))
    shards.write_manifest(data, kind="test", resolution=32, shards=[entry], inputs=32)
    states = {}
    for workers in (1, 2):
        run = str(tmp_path / f"run-{workers}")
        cfg = load_config("configs/tiny-test.yaml", {
            "data": data, "run": run, "train.steps": 3, "train.batch_size": 32, "train.shuffle_buffer": 0, "train.precision": "fp64",
            "cluster.workers": workers, "cluster.cpus_per_worker": 0.5,
        })
        assert train(cfg)["step"] == 3
        state = checkpoints.load_state(run, 3)
        states[workers] = {f"{net}.{k}": v for net in ("generator", "discriminator") for k, v in state[net].items()}
    one, two = states[1], states[2]
    assert one.keys() == two.keys() and any("running_var" in k for k in one)
    worst = {k: (one[k].double() - two[k].double()).abs().max().item() for k in one}
    assert max(worst.values()) < 1e-9, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def _grad_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for case, w_scale in (("both", (1.0, 1.0)), ("rank0-only", (1.0, 0.0))):
            ref, bn = bn_pair()
            bn.double()
            x, w = (t.double() for t in batch_and_weights())
            part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            y, gx = forward_backward(bn, x[part], w[part] * w_scale[rank])
            for p in bn.parameters():
                dist.all_reduce(p.grad)
            out[case] = {"y": y, "gx": gx, "grads": [p.grad for p in bn.parameters()]}
        torch.save(out, os.path.join(out_dir, f"grad{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_float64_gradient_over_two_processes_equals_one_process_on_the_concatenated_batch(tmp_path):
    """The backward pass of the cross-replica statistics is the layer's own (not a torch version's differentiable
    all-reduce): in float64, d(loss)/d(x, weight, bias) over 2 gloo processes equals nn.BatchNorm2d's on the whole
    batch to 1e-12, also where only rank 0's outputs enter the loss (rank 1's inputs still get their gradient
    through the shared statistics; a backward that skipped the all-reduce would give them none)."""
    mp.spawn(_grad_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    half = BATCH // 2
    for case, w_scale in (("both", 1.0), ("rank0-only", 0.0)):
        ref, _ = bn_pair()
        ref.double()
        x, w = (t.double() for t in batch_and_weights())
        w = torch.cat([w[:half], w[half:] * w_scale])
        y, gx = forward_backward(ref, x, w)
        close = dict(rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.cat([r[case]["y"] for r in ranks]), y, **close)
        torch.testing.assert_close(torch.cat([r[case]["gx"] for r in ranks]), gx, **close)
        torch.testing.assert_close(ranks[0][case]["grads"], [ref.weight.grad, ref.bias.grad], **close)
        if case == "rank0-only":
            assert ranks[1][case]["gx"].abs().max() > 1e-3  # through the statistics, from rank 0's loss
