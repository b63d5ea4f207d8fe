"""What a run holds, answered from storage alone (layer: dcgan): its stored config, whether it is finished, its
summary. The trainer, the CLI and the Prefect tasks ask here, so none of them imports the trainer to read a file."""

from __future__ import annotations

from typing import Any

from dcgan import checkpoints, run_layout
from dcgan.config import Config, parse_config_text
from dcgan.run_log import read_metrics
from preprocessing import storage


def stored_config(run_uri: str) -> Config | None:
    """The configuration a run was started with (its config.yaml), or None for a new run."""
    uri = run_layout.config(run_uri)
    if not storage.exists(uri):
        return None
    return parse_config_text(storage.read_text(uri), uri)


def is_finished(cfg: Config, step: int | None) -> bool:
    """Whether a run whose newest valid checkpoint is at `step` is complete: the one rule."""
    return step is not None and step >= cfg.train.steps


def finished_step(cfg: Config) -> int | None:
    """The step of the run's newest valid checkpoint if it reached `train.steps` (the run is complete), else None.
    Asked before every start and resume: a run with no COMPLETE marker at `train.steps` is not finished, so only then
    are a checkpoint's bytes read and checked (a resume reads its state once, in the trainer)."""
    markers = checkpoints.complete_steps(cfg.run_uri)
    if not markers or not is_finished(cfg, markers[-1]):
        return None
    done = checkpoints.latest_step(cfg.run_uri)
    return done if is_finished(cfg, done) else None


def run_summary(cfg: Config, step: int, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run at `step` offers: its URIs (from storage layout alone) and the last logged metrics, if given."""
    return {
        "run": cfg.run_uri,
        "step": step,
        "checkpoint": run_layout.checkpoint(cfg.run_uri, step),
        "samples": run_layout.samples(cfg.run_uri, step),
        "metrics": {k: v for k, v in (metrics or {}).items() if k not in ("checkpoint", "samples")},
    }


def stored_summary(cfg: Config) -> dict[str, Any]:
    """The run's summary at its newest valid checkpoint, with the last metrics row it logged."""
    rows = read_metrics(cfg.run_uri)
    return run_summary(cfg, checkpoints.latest_step(cfg.run_uri) or 0, rows[-1] if rows else None)
