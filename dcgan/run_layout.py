"""Where a run keeps its files (layer: dcgan): every path under <run>/ is built here.

    <run>/config.yaml                    the resolved configuration the run was started (or last resumed) with
    <run>/checkpoints/step-NNNNNNN/      state.pt + COMPLETE (dcgan.checkpoints)
    <run>/samples/step-NNNNNNN.png       the fixed-z grid of each checkpoint
    <run>/metrics/metrics.csv            training metrics (and metrics/tensorboard/)
    <run>/eval/step-NNNNNNN/             one evaluation's report.md/html, metrics.json and pictures
    <run>/eval/metrics.jsonl             one line per evaluation; eval/report.md lists them
    <run>/ray/                           Ray Train's own run state
    <run>/lease.json                     who trains the run now (dcgan.lease): present only while a driver runs
"""

from __future__ import annotations

from preprocessing.storage import join

CONFIG_FILE = "config.yaml"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def config(run: str) -> str:
    return join(run, CONFIG_FILE)


def checkpoints(run: str) -> str:
    return join(run, "checkpoints")


def checkpoint(run: str, step: int) -> str:
    return join(run, "checkpoints", step_name(step))


def samples(run: str, step: int) -> str:
    return join(run, "samples", f"{step_name(step)}.png")


def metrics(run: str) -> str:
    """The folder of metrics.csv and tensorboard/."""
    return join(run, "metrics")


def metrics_csv(run: str) -> str:
    return join(run, "metrics", "metrics.csv")


def eval_step(run: str, step: int) -> str:
    return join(run, "eval", step_name(step))


def eval_history(run: str) -> str:
    return join(run, "eval", "metrics.jsonl")


def eval_index(run: str, html: bool = False) -> str:
    return join(run, "eval", "report.html" if html else "report.md")


def lease(run: str) -> str:
    return join(run, "lease.json")


def ray(run: str) -> str:
    return join(run, "ray")
