"""Ray Train's failure handling with the project's fault classes (layer: dcgan; imports Ray Train, so it is
imported only where training starts).

Ray Train restarts the worker group on any worker error, up to `cluster.max_failures` times: right for a lost
worker or node, wrong for bad input (a shard whose sha256, size or row count differs from the manifest), which
fails the same way on every attempt (issue 21: 4 attempts over 77 s, then fragments of tracebacks). `Trainer` is a
TorchTrainer whose failure policy raises a known fault that is not transient (preprocessing.errors) at once and
leaves every other failure to Ray's default policy. Ray 2.60 takes no policy from its public API: the hook is the
trainer's `_initialize_and_run_controller`, which receives the policy it will use (pinned Ray version).
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from preprocessing.errors import TransientError, known_fault


class KnownFaultPolicy(DefaultFailurePolicy):
    """Ray's default decisions, except that bad input is raised at the first failure instead of retried."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        known = known_fault(training_failed_error)
        if known is not None and not isinstance(known, TransientError):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """A TorchTrainer that runs its controller with `KnownFaultPolicy`."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("failure_policy")
        if type(policy) is DefaultFailurePolicy:
            controller_init_kwargs["failure_policy"] = KnownFaultPolicy(policy.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
