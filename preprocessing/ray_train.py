"""One way to run a Ray Train fit (layer: preprocessing): the GAN's training (`dcgan.train`) and the dedup
autoencoder on GPUs (`preprocessing.dedup.model.fit_ray_train`; on CPUs it is one plain Ray task) both start here,
so both follow the same rules: the cluster settings (`ClusterConfig`: workers, GPUs, placement, `max_failures`), Ray
Train's failure handling with the project's fault classes, Ctrl-C at once, and a worker's known fault raised as
itself (one line from the CLI).

Ray Train restarts the worker group on any worker error, up to `cluster.max_failures` times: right for a lost
worker or node, wrong for bad input (a shard whose sha256, size or row count differs from the manifest), which
fails the same way on every attempt (issue 21: 4 attempts over 77 s, then fragments of tracebacks). `Trainer` is a
TorchTrainer whose failure policy raises a known fault that is not transient (preprocessing.errors) at once and
leaves every other failure to Ray's default policy. Ray 2.60 takes no policy from its public API: the hook is the
trainer's `_initialize_and_run_controller`, which receives the policy it will use (pinned Ray version).

Ray also retries, for ever, a worker group it cannot place within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s): a
training on a busy cluster, or one waiting for an autoscaler's node that never comes, would hang silently. The policy
gives up after `workers_wait_s()` and the caller reports it in one line (`dcgan.resources.never_placed`).

Ray Train's controller also starts helper actors, each a fresh Python process beside the workers' own start: a
preemption watcher, which only logs a node's drain and tells a training function that asks (ours does not), and a
dataset manager for the Ray Datasets a trainer is given (ours are given none: each worker reads its own stream of
shards). `Trainer` starts neither (issue 22: a training's fixed start-up). On the process's own local Ray
(`compute.owns_ray`) it starts no placement group cleaner either: that actor removes a dead controller's placement
group, which a local Ray removes anyway when it stops with the process; it asks the State API, which a local Ray
here does not serve, and with another Ray on the machine it could not tell which was its own and printed a
traceback on the user's console ("Found multiple active Ray instances") in runs that went well.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

from ray.train import FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import (CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
                                              DEFAULT_WORKER_GROUP_START_TIMEOUT_S, ENABLE_PREEMPTION_WATCHER_ENV_VAR,
                                              HEALTH_CHECK_INTERVAL_S_ENV_VAR, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import ControllerError

from preprocessing import storage
from preprocessing.compute import owns_ray, workers_wait_s
from preprocessing.config import ClusterConfig
from preprocessing.errors import TransientError, UserError, known_fault


def _start_timeout_s() -> float:
    return float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR) or DEFAULT_WORKER_GROUP_START_TIMEOUT_S)


class KnownFaultPolicy(DefaultFailurePolicy):
    """Ray's default decisions, except that bad input is raised at the first failure instead of retried, and workers
    that are not placed are waited for `wait_s` (measured in the controller, across Ray's start attempts)."""

    def __init__(self, failure_config, wait_s: float | None = None, start_timeout_s: float | None = None):
        super().__init__(failure_config)
        self.wait_s = workers_wait_s() if wait_s is None else wait_s
        self.start_timeout_s = _start_timeout_s() if start_timeout_s is None else start_timeout_s
        self._unplaced_since: float | None = None

    def make_decision(self, training_failed_error) -> FailureDecision:
        known = known_fault(training_failed_error)
        if known is not None and not isinstance(known, TransientError):
            return FailureDecision.RAISE
        if isinstance(training_failed_error, ControllerError) and isinstance(
                training_failed_error.controller_failure, WorkerGroupStartupTimeoutError):
            now = time.monotonic()
            if self._unplaced_since is None:  # the first attempt began one start timeout ago
                self._unplaced_since = now - self.start_timeout_s
            if now - self._unplaced_since >= self.wait_s - 1e-6:
                return FailureDecision.RAISE
        else:
            self._unplaced_since = None  # a group that failed later had been placed
        return super().make_decision(training_failed_error)


POLL_INTERVAL_S = 0.5  # the controller's look at its workers; with Ray's 2 s each of its steps waited up to 2 s


@contextlib.contextmanager
def _controller_env(wait_s: float) -> Iterator[None]:
    """Settings Ray Train's controller reads from the driver's environment when it starts, unless the user set them:
    a wait shorter than Ray's start timeout shortens that timeout, the controller polls its workers every
    POLL_INTERVAL_S (it notices a finished or failed worker group at its next poll; a poll is one small call a
    worker), and it starts no preemption watcher."""
    ours = {HEALTH_CHECK_INTERVAL_S_ENV_VAR: f"{POLL_INTERVAL_S:g}", ENABLE_PREEMPTION_WATCHER_ENV_VAR: "0"}
    if wait_s < DEFAULT_WORKER_GROUP_START_TIMEOUT_S:
        ours[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = f"{max(wait_s, 1.0):g}"
    ours = {k: v for k, v in ours.items() if k not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)


class Trainer(TorchTrainer):
    """A TorchTrainer that runs its controller with `KnownFaultPolicy`, without a dataset manager when it is given
    no Ray Dataset, and without a placement group cleaner on the process's own local Ray."""

    def _create_default_callbacks(self):
        unwanted = (() if self.datasets else (DatasetsCallback,)) + \
            ((PlacementGroupCleanerCallback,) if owns_ray() else ())
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unwanted)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("failure_policy")
        wait_s = workers_wait_s()
        with _controller_env(wait_s):
            if type(policy) is DefaultFailurePolicy:
                controller_init_kwargs["failure_policy"] = KnownFaultPolicy(policy.failure_config, wait_s)
            return super()._initialize_and_run_controller(**controller_init_kwargs)


def checkpoint_memory(run_dir: str) -> str:
    """The file in which Ray Train remembers the checkpoints it registered in a Ray Train run folder (`run_dir`: the
    RunConfig's storage_path/name), which it reads when a fit starts there."""
    return storage.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def scaling(cluster: ClusterConfig, cpus_per_worker: float | None = None) -> ScalingConfig:
    """The workers the cluster settings ask for: `cluster.workers` (one GPU each with `use_gpu`), placed as
    `cluster.placement` says; `cpus_per_worker` overrides the setting for a fit whose workers need less."""
    cpus = cluster.cpus_per_worker if cpus_per_worker is None else cpus_per_worker
    return ScalingConfig(num_workers=cluster.workers, use_gpu=cluster.use_gpu,
                         resources_per_worker={"CPU": cpus, **({"GPU": 1} if cluster.use_gpu else {})},
                         placement_strategy=cluster.placement)


def failures(cluster: ClusterConfig) -> FailureConfig:
    """Lost workers and nodes are recovered from up to `cluster.max_failures` times (bad input never: `Trainer`)."""
    return FailureConfig(max_failures=cluster.max_failures)


def fit(trainer: Trainer, unplaced: Callable[[BaseException], UserError | None] | None = None) -> Any:
    """`trainer.fit()`; a worker's known fault (a DatasetError, say) raised as itself and, with `unplaced`, workers
    that were never placed as the one-line fault it makes; anything else as it is. Ctrl-C is a KeyboardInterrupt at
    once: Ray Train's own SIGINT handler asks the controller to abort, which never returns while the job waits for
    resources, and exits 0 at the third Ctrl-C."""
    trainer._register_sigint_handler = lambda controller: None
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as err:
        known = known_fault(err) or (unplaced(err) if unplaced else None)
        if known is None:
            raise
        raise known from None
    return result
