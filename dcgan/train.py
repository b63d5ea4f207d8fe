"""DCGAN training on Ray Train: one worker per GPU (or CPU slot), many nodes, each worker reading its slice of every
global batch itself (preprocessing.stream; layer: dcgan). Over 300 lines because the driver's checks, the worker loop and its checkpoint hand-off share one life cycle
(resume, failure, progress) that reads best in one place.

The driver checks everything it can before a worker starts (dataset manifest, resolution, batch split, writable run
URI), writes the resolved config, and runs a TorchTrainer. Each worker resumes from the run's newest complete
checkpoint by itself, so Ray Train's failure handling (a lost worker or node restarts the group) continues the run
instead of starting over. Rank 0 writes metrics, checkpoints and a fixed-z sample grid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch

from dcgan import checkpoints, lease, resources, run_layout, scratch
from dcgan.batchnorm import local_statistics
from dcgan.config import Config, ConfigError, dump_config, parse_config
from dcgan.networks import Discriminator, Generator, sample_z
from dcgan.run_log import RunLog, mlflow_client, opened, read_metrics
from dcgan.run_state import is_finished, run_summary, stored_config, stored_summary
from dcgan.sampling import generate, grid, save_png
from dcgan.step import METRICS, GANStep, StepOptions, make_optimizers
from preprocessing import compute, ownership, progress, shards, storage, stream
from preprocessing.errors import InputError, NoSpaceError

log = logging.getLogger("dcgan.train")


def say(line: str) -> None:
    """A line on the worker's stderr, which Ray forwards to the driver's stderr and the job log once (Ray Train's
    patched `print` would also copy it into its own logger, and the console would show it twice)."""
    sys.stderr.write(f"[dcgan] {line}\n")
    sys.stderr.flush()

# Chaos hook for tests and drills: the named worker rank exits once when it reaches this step.
FAIL_AT_STEP_ENV = "DCGAN_FAIL_AT_STEP"
N_FIXED_SAMPLES = 64


def fixed_z(cfg: Config) -> torch.Tensor:
    """The same 64 z for the whole run, so the sample grids show one run's progress."""
    return sample_z(cfg.model, N_FIXED_SAMPLES, generator=torch.Generator().manual_seed(cfg.train.seed + 7919))


def checked_data(cfg: Config) -> dict[str, Any]:
    """The dataset's manifest, once it is known to be a complete dataset that fits the model, and the tracking
    settings usable: checked before Ray is started or joined (a missing dataset was one line only after a local Ray
    had started, ~10 s)."""
    manifest = shards.read_manifest(cfg.data_uri)
    if manifest["resolution"] != cfg.model.resolution:
        raise ConfigError(
            f"model.resolution is {cfg.model.resolution} but dataset {cfg.data_uri} is {manifest['resolution']}px"
        )
    if manifest.get("channels", 3) != cfg.model.channels:
        raise ConfigError(f"model.channels is {cfg.model.channels} but the dataset has {manifest.get('channels', 3)}")
    rows = manifest["counts"]["rows"]
    if rows < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) exceeds the dataset's {rows} rows")
    mlflow_client()  # MLFLOW_TRACKING_URI set without mlflow installed: one line now, not a worker's traceback later
    return manifest


def preflight(cfg: Config) -> None:
    """Fail before any worker starts, and before the run's files change (after `checked_data`): the workers must fit
    the cluster; the run location must be ours (or new); a resumed run must keep its networks."""
    resources.check_fits(cfg.cluster)  # Ray would wait for ever for workers the cluster cannot place
    ownership.claim(cfg.run_uri, "run", legacy=lambda uri: stored_config(uri) is not None)
    check_resumable(cfg)


def check_resumable(cfg: Config) -> None:
    """A run resumes only with the networks it was trained with: a changed model section is one clear error."""
    stored = stored_config(cfg.run_uri)
    if stored is None or stored.model == cfg.model:
        return
    before, after = stored.model.model_dump(), cfg.model.model_dump()
    changed = [f"model.{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k]]
    raise ConfigError(f"{cfg.run_uri} was trained with another model ({'; '.join(changed)}); resume it with its own "
                      f"config ({run_layout.config(cfg.run_uri)}) or train into a new --run")


def resume_state(run_uri: str, resume: tuple[int, Any] | None, rank: int, world: int) -> dict[str, Any] | None:
    """What the workers start from, read once for all of them: the state the driver read before the fit (`resume`
    = (step, object ref), from Ray's object store), unless the run has a newer checkpoint (Ray Train restarted the
    group after a failure): rank 0 then reads it and hands it to the others. Only a newer COMPLETE marker makes the
    workers verify a checkpoint's bytes."""
    import ray

    newer = [s for s in checkpoints.complete_steps(run_uri) if resume is None or s > resume[0]]
    if not newer:
        return ray.get(resume[1]) if resume is not None else None
    newest = checkpoints.latest_step(run_uri)
    if resume is not None and (newest is None or newest <= resume[0]):
        return ray.get(resume[1])
    if newest is None:
        return None
    if world == 1:
        return checkpoints.load_state(run_uri)
    import torch.distributed as dist

    box = [checkpoints.load_state(run_uri) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    # Ray Train logs a failed background checkpoint upload (a full disk) with its traceback before it fails the run,
    # which then ends in the fault's one line
    compute.no_known_fault_tracebacks("ray", "ray.train")
    cfg = parse_config(loop_config["config"])
    run_uri, train_cfg = cfg.run_uri, cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads"])

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    g, d = Generator(cfg.model), Discriminator(cfg.model)
    options = StepOptions.resolve(train_cfg, device)
    if options.fp64:  # before a checkpoint's float64 weights load: a float32 module would round them
        g, d = g.double(), d.double()
    opt_g, opt_d = make_optimizers(g, d, train_cfg, fused=options.fused_adam)
    step, state = 0, resume_state(run_uri, loop_config.get("resume"), rank, world)
    if state is not None:
        g.load_state_dict(state["generator"])
        d.load_state_dict(state["discriminator"])
        step = int(state["step"])
    gan = GANStep(g, d, opt_g, opt_d, cfg.model, train_cfg, device, options, distributed=world > 1)
    if state is not None:  # optimizer state after the modules moved to the device
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
    gan.iteration = step
    if world > 1:
        import torch.distributed as dist

        for t in list(g.state_dict().values()) + list(d.state_dict().values()):
            dist.broadcast(t, src=0)
    spec, note = input_stream(cfg, state)
    if rank == 0:
        say(f"{'resuming at' if state else 'starting'} step {step}/{train_cfg.steps}: "
            f"{world} worker(s) on {device}, batch {train_cfg.batch_size} ({train_cfg.batch_size // world}/worker), "
            f"{options}{note}")

    z_fixed = fixed_z(cfg)
    watch = _watch_driver(loop_config.get("lease"), rank, run_uri)
    if rank == 0:
        scratch.clear(run_uri)  # what a killed rank 0 of this run left on this machine
    with opened(run_uri, step, rank == 0) as run_log:  # rank 0's metrics; its scratch folder goes either way
        # rank 0's progress lines reach the driver (and a Ray Job's log) through Ray's log forwarding
        shown = progress.Progress("train", train_cfg.steps, "steps", initial=step, stream=sys.stderr, bar=False,
                                  show=rank == 0)
        fail_at = loop_config.get("fail_at_step")
        fail_marker = run_layout.injected_fault(run_uri)
        rows = stream.WorkerStream(cfg.data_uri, loop_config["manifest"], spec, rank, world, step, train_cfg.steps)
        acc, n_acc, t0 = torch.zeros(len(METRICS), device=device), 0, time.perf_counter()
        last: dict[str, float] = {}
        for table in rows:
            acc += gan(torch.from_numpy(np.array(shards.images_of(table))))  # owned memory, not Arrow's
            n_acc += 1
            step += 1
            if fail_at and step == fail_at and rank == world - 1 and not storage.exists(fail_marker):
                storage.write_text(fail_marker, f"worker {rank} exited at step {step}\n")
                os._exit(1)
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                values = (acc / n_acc).tolist()  # the one host sync per log interval
                elapsed = time.perf_counter() - t0
                last = dict(zip(METRICS, values), images_per_s=n_acc * train_cfg.batch_size / elapsed,
                            epoch=rows.plan.epoch(step - 1))
                if run_log:
                    watch()
                    run_log.log(step, last)
                    shown.update(step, note=f"loss_D {last['loss_d']:.3f} loss_G {last['loss_g']:.3f} "
                                            f"D(x) {last['d_x']:.3f} D(G(z)) {last['d_g_z']:.3f} "
                                            f"{last['images_per_s']:.0f} img/s")
                acc.zero_()
                n_acc, t0 = 0, time.perf_counter()
            if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
                if rank == 0:
                    watch()
                    _checkpoint(cfg, step, gan, z_fixed, last, run_log, {"stream": spec.as_dict(), "workers": world})
                    run_log.flush()
                else:
                    ray.train.report({"step": step, **last})  # the other ranks meet rank 0 here, without waiting for S3
            if step >= train_cfg.steps:
                break
        if step < train_cfg.steps:  # the dataset holds fewer rows than its manifest says: a retry would end the same
            raise InputError(f"worker {rank}: the training stream of {cfg.data_uri} ended at step {step} of "
                             f"{train_cfg.steps} (the dataset holds fewer rows than its manifest says)")
        shown.close()


def _watch_driver(watched: dict[str, Any] | None, rank: int, run_uri: str):
    """A worker whose driver died (or lost the run's lease) stops itself, rank 0 removing its scratch folders first
    (`os._exit` runs no cleanup): a thread checks the lease every sixth of its lifetime, and rank 0 checks it again
    before each write. Returns that check."""
    if not watched:
        return lambda: None
    watch = lease.Watch(**watched)

    def stop(reason: str) -> None:
        say(f"worker {rank} stops: {reason}")
        if rank == 0:
            scratch.clear(run_uri)
        os._exit(3)

    watch.start(stop)

    def check() -> None:
        reason = watch.problem()
        if reason:
            stop(reason)

    return check


def _checkpoint(cfg: Config, step: int, gan: GANStep, z_fixed: torch.Tensor, metrics: dict[str, float],
                run_log: RunLog, extra: dict[str, Any]) -> None:
    """Rank 0: the fixed-z sample grid, then the checkpoint, handed to Ray Train, which uploads it to
    <run>/checkpoints/step-NNNNNNN/ in the background (training goes on) and keeps the newest `keep_checkpoints`."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    state = {
        "generator": gan.g_module.state_dict(),
        "discriminator": gan.d_module.state_dict(),
        "opt_g": gan.opt_g.state_dict(),
        "opt_d": gan.opt_d.state_dict(),
        "step": step,
        "rng": torch.get_rng_state(),
        "fixed_z": z_fixed,
        "config": cfg.model_dump(mode="json"),
        **extra,
    }
    with local_statistics(gan.g_module):  # rank 0 alone draws the grid: no cross-replica BatchNorm
        images = generate(gan.g_module, z_fixed)
    picture = grid(images, nrow=8)
    grid_uri = save_png(picture, run_layout.samples(cfg.run_uri, step))
    run_log.image(step, picture)
    folder = checkpoints.write_dir(scratch.make(cfg.run_uri, "ckpt"), step, state)  # Ray deletes it after upload
    ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(str(folder)),
                     checkpoint_dir_name=run_layout.step_name(step), checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    say(f"checkpoint {run_layout.checkpoint(cfg.run_uri, step)}  samples {grid_uri}")


def input_stream(cfg: Config, state: dict[str, Any] | None) -> tuple[stream.StreamSpec, str]:
    """The run's stream and what to say of it: a resumed run keeps the stream its checkpoint was trained on (the same
    global batches whatever the worker count now), a new one takes it from the config."""
    spec = stream.StreamSpec.of(cfg.train.batch_size, cfg.train.shuffle_buffer, cfg.train.seed, cfg.train.lanes)
    if state is None or "stream" not in state:
        return spec, ""
    stored = stream.StreamSpec(**state["stream"])
    note = ""
    if int(state.get("workers", cfg.cluster.workers)) != cfg.cluster.workers:
        note = (f"; the checkpoint was trained on {state['workers']} worker(s), now {cfg.cluster.workers}: "
                "the same stream continues")
    if stored != spec:
        note += f"; the checkpoint's stream {stored.as_dict()} continues (the config asks {spec.as_dict()})"
    return stored, note


def _keep_newest_checkpoints(cfg: Config, valid: int | None = None) -> None:
    """Ray Train keeps the newest `keep_checkpoints` it registered; one uploaded just before a driver or worker died,
    or by workers whose driver had died (they train on until their lease watch notices, up to two renewals, and may
    even finish the run), was never registered, and nothing else would remove it: the run keeps `keep_checkpoints`
    all the same (`checkpoints.surplus_steps`). The caller holds the run's lease."""
    for step in checkpoints.surplus_steps(cfg.run_uri, cfg.train.keep_checkpoints, valid):
        storage.delete_prefix(run_layout.checkpoint(cfg.run_uri, step))


def _forget_rays_checkpoints(cfg: Config) -> None:
    """Ray Train remembers the checkpoints it registered in a run (`ray_train.checkpoint_memory`) and, past
    `keep_checkpoints`, removes the oldest it remembers, by folder. The run's resume point and retention are the
    project's (`checkpoints.resume_state`, `_keep_newest_checkpoints`); what Ray remembered of earlier fits only did
    harm: a run resumed from an older step than its newest checkpoint (the newer ones corrupt or cut off) writes
    those steps' folders again, and Ray removed the new folders for the old ones (a rerun of a run whose two
    checkpoints were cut off ended with none, exit 0); and a remembered folder that the run's retention had removed
    makes Ray refuse to start. So each fit starts with none remembered: Ray keeps this fit's newest, the run's
    retention the run's (older ones stay until the fit ends). The caller holds the run's lease."""
    from preprocessing import ray_train

    storage.delete_prefix(ray_train.checkpoint_memory(run_layout.checkpoints(cfg.run_uri)))


@contextlib.contextmanager
def _followed(cfg: Config, every_s: float = 5.0) -> Iterator[None]:
    """For progress listeners in this process (a Prefect task's progress artifact): the run's step, read from its
    metrics.csv while the workers train (rank 0's own progress lines reach the console through Ray's log)."""
    if not progress.listening():
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                rows = read_metrics(cfg.run_uri)
            except Exception:  # noqa: BLE001 - not written yet, or a storage hiccup: the next poll will tell
                continue
            if rows:
                progress.notify(progress.Update("train", int(rows[-1]["step"]), cfg.train.steps, "steps"))

    follower = threading.Thread(target=poll, name="dcgan-train-progress", daemon=True)
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join(timeout=every_s * 2)
        try:
            rows = read_metrics(cfg.run_uri)
        except Exception:  # noqa: BLE001 - a failed run may have none; its failure is what gets reported
            rows = []
        if rows:  # where the run ended (also when it was shorter than one poll)
            progress.notify(progress.Update("train", int(rows[-1]["step"]), cfg.train.steps, "steps"))


def train(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the run `cfg.run_uri` on the dataset `cfg.data_uri` until `cfg.train.steps`, as its one
    writer (dcgan.lease: a second driver is refused). Ray is joined only for steps to train: a finished run's rerun
    (it removes what driverless workers left, `_keep_newest_checkpoints`) starts none."""
    manifest = checked_data(cfg)
    markers = checkpoints.complete_steps(cfg.run_uri)  # "looks finished" from the markers: no checkpoint is read here
    if not markers or not is_finished(cfg, markers[-1]):
        compute.connect(cfg.cluster.address)  # before the preflight: it checks that the workers fit the cluster
    preflight(cfg)
    with lease.held(cfg.run_uri) as held:
        return _train_held(cfg, manifest, held)


def _train_held(cfg: Config, manifest: dict[str, Any], held: lease.Lease) -> dict[str, Any]:
    # Where the run stands, read once: the newest valid checkpoint's state (a corrupt newer one is reported in one
    # warning and skipped, as `run_state.finished_step` skips it): finished, or the resume point.
    state = checkpoints.resume_state(cfg.run_uri)
    if state is not None and is_finished(cfg, int(state["step"])):
        log.info("%s already has a checkpoint at step %d >= %d: nothing to train", cfg.run_uri, state["step"],
                 cfg.train.steps)
        _keep_newest_checkpoints(cfg, int(state["step"]))  # what driverless workers that finished the run left
        return run_summary(cfg, int(state["step"]))
    storage.write_text(run_layout.config(cfg.run_uri), dump_config(cfg))

    from ray.train import CheckpointConfig, LoggingConfig, RunConfig

    from preprocessing import ray_train  # the one launcher: cluster settings, failure policy, known faults

    import ray

    if not ray.is_initialized():  # its markers said finished, but its newest valid checkpoint is older: no Ray yet
        compute.connect(cfg.cluster.address)
        resources.check_fits(cfg.cluster)
    fs, path = storage.arrow_filesystem(cfg.run_uri)
    # Ray Train's run is <run>/checkpoints: its checkpoints are the run's (step-NNNNNNN), its retention is the run's
    run_config = RunConfig(name="checkpoints", storage_path=path, storage_filesystem=fs,
                           checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                           failure_config=ray_train.failures(cfg.cluster),
                           # Every failure reaches the driver once: a worker's known fault as one line, anything else
                           # with each worker's traceback; Ray Train's console copies of it would only repeat it.
                           logging_config=LoggingConfig(log_level="CRITICAL"))
    _forget_rays_checkpoints(cfg)
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    resume = None
    if state is not None:
        resume = (int(state["step"]), ray.put(state))
        log.info("resuming %s from step %d%s", cfg.run_uri, resume[0], input_stream(cfg, state)[1])
    trainer = ray_train.Trainer(
        _worker_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "threads": max(1, round(cfg.cluster.cpus_per_worker)),
            "fail_at_step": int(fail_at) if fail_at else None,
            "resume": resume,
            "manifest": manifest,
            "lease": held.watch_config(),
        },
        scaling_config=ray_train.scaling(cfg.cluster),
        run_config=run_config,
    )
    try:
        with _followed(cfg):  # Ctrl-C: exit 130 at once, the run resumable
            ray_train.fit(trainer, unplaced=lambda err: resources.never_placed(err, cfg.cluster))
    except NoSpaceError as err:  # Ray Train's background upload of a checkpoint into the run names no file
        raise err.at(cfg.run_uri) from None
    finally:  # what a rank 0 Ray ended on this machine left (a local run's workers share it)
        scratch.clear(cfg.run_uri)
    _keep_newest_checkpoints(cfg)
    return stored_summary(cfg)
