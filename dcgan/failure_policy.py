"""Ray Train's failure handling, told which worker failures a retry cannot cure (layer: dcgan; imported only where
Ray Train runs).

Ray Train's FailureConfig retries every worker failure up to `max_failures` times. A worker's known fault that is not
transient (a damaged dataset, a stream that ended early: preprocessing.errors.UserError) fails the same way on every
retry, so it ends the fit at once and reaches the user as one line; a lost worker or node, a transient storage fault
or a bug is retried as before. Ray 2.60 has no public hook for this: its trainer builds the policy with
`create_failure_policy`, which `known_faults_not_retried` swaps for the length of one fit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from preprocessing.errors import TransientError


class KnownFaultPolicy(DefaultFailurePolicy):
    def make_decision(self, training_failed_error) -> FailureDecision:
        from dcgan.train import known_fault

        known = known_fault(training_failed_error)
        if known is not None and not isinstance(known, TransientError):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


@contextlib.contextmanager
def known_faults_not_retried() -> Iterator[None]:
    from ray.train.v2.api import data_parallel_trainer

    original = getattr(data_parallel_trainer, "create_failure_policy", None)
    if original is None:  # another Ray: its own policy (a known fault is then retried, and still ends as one line)
        yield
        return
    data_parallel_trainer.create_failure_policy = KnownFaultPolicy
    try:
        yield
    finally:
        data_parallel_trainer.create_failure_policy = original
