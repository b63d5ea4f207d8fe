"""What makes an evaluation of a step that evaluation, and whether a run holds one already (layer: dcgan).

Kept free of torch and of the suites on purpose: the CLI asks "already evaluated?" before it submits a job, and a
caller that only submits should not pay for importing what the evaluation computes with.
"""

from __future__ import annotations

from dcgan import run_layout
from dcgan.config import SUITES, EvalConfig
from preprocessing import storage
from preprocessing.errors import InputError


def check_suites(suites: list[str]) -> list[str]:
    """The suites asked for, in the report's order; an unknown name is an InputError."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise InputError(f"unknown evaluation suites {unknown}; choose from {', '.join(SUITES)}")
    return [s for s in SUITES if s in suites]


def evaluation_inputs(cfg: EvalConfig, data_uri: str | None, arithmetic: str | None, boxes: str | None) -> dict:
    """What makes an evaluation of a step this evaluation (recorded in its metrics.json)."""
    return {"suites": check_suites(list(cfg.suites)), "n_samples": cfg.n_samples, "data": data_uri,
            "arithmetic": arithmetic, "boxes": boxes, "cifar10": cfg.cifar10, "svhn": cfg.svhn,
            "inception_weights": cfg.inception_weights}


def already_evaluated(run_uri: str, step: int, inputs: dict) -> dict | None:
    """The metrics of step `step` if it was evaluated with these `inputs`: the one test of "already evaluated"."""
    uri = run_layout.eval_metrics(run_layout.eval_step(run_uri, step))
    try:
        done = storage.read_json(uri) if storage.exists(uri) else None
    except storage.StorageUnreachable:
        raise
    except (storage.StorageError, ValueError):
        return None
    return done if done is not None and done.get("inputs") == inputs else None
