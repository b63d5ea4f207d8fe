"""Where a run keeps its files (layer: dcgan): every path under <run>/ is built here.

    <run>/config.yaml                    the resolved configuration the run was started (or last resumed) with
    <run>/checkpoints/step-NNNNNNN/      state.pt + COMPLETE (dcgan.checkpoints)
    <run>/samples/step-NNNNNNN.png       the fixed-z grid of each checkpoint (`dcgan sample`: sample-step-...png)
    <run>/metrics/metrics.csv            training metrics (and metrics/tensorboard/)
    <run>/eval/step-NNNNNNN/             one evaluation's report.md/html, metrics.json and pictures
    <run>/eval/metrics.jsonl             one line per evaluation; eval/report.md lists them
    <run>/ray/                           Ray Train's own run state
    <run>/rayjobs/<name>.yaml            the config each RayJob of the run ran (cluster.submit: rayjob)
    <run>/lease.json                     who trains the run now (dcgan.lease): present only while a driver runs
"""

from __future__ import annotations

from preprocessing.storage import join

CONFIG_FILE = "config.yaml"
STATE_FILE, MARKER_FILE = "state.pt", "COMPLETE"  # a checkpoint folder's two files


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def config(run: str) -> str:
    return join(run, CONFIG_FILE)


def checkpoints(run: str) -> str:
    return join(run, "checkpoints")


def checkpoint(run: str, step: int) -> str:
    return join(run, "checkpoints", step_name(step))


def checkpoint_state(checkpoint_uri: str) -> str:
    """The weights and optimiser state of a checkpoint folder."""
    return join(checkpoint_uri, STATE_FILE)


def checkpoint_marker(checkpoint_uri: str) -> str:
    """Written last: its presence (and sha256 of state.pt) makes the checkpoint complete."""
    return join(checkpoint_uri, MARKER_FILE)


def samples(run: str, step: int) -> str:
    return join(run, "samples", f"{step_name(step)}.png")


def sample_grid(run: str, step: int, seed: int) -> str:
    """Where `dcgan sample` writes a grid by default."""
    return join(run, "samples", f"sample-{step_name(step)}-seed-{seed}.png")


def metrics(run: str) -> str:
    """The folder of metrics.csv and tensorboard/."""
    return join(run, "metrics")


def metrics_csv(run: str) -> str:
    return join(run, "metrics", "metrics.csv")


def tensorboard(run: str) -> str:
    return join(run, "metrics", "tensorboard")


def eval_step(run: str, step: int) -> str:
    return join(run, "eval", step_name(step))


def eval_report(out: str, html: bool = False) -> str:
    """An evaluation's report in its folder `out` (`eval_step`)."""
    return join(out, "report.html" if html else "report.md")


def eval_metrics(out: str) -> str:
    """An evaluation's numbers in its folder `out`; present == that step is evaluated."""
    return join(out, "metrics.json")


def eval_file(out: str, name: str) -> str:
    """A picture or array an evaluation suite writes into its folder `out`."""
    return join(out, name)


def eval_history(run: str) -> str:
    return join(run, "eval", "metrics.jsonl")


def eval_index(run: str, html: bool = False) -> str:
    return join(run, "eval", "report.html" if html else "report.md")


def lease(run: str) -> str:
    return join(run, "lease.json")


def injected_fault(run: str) -> str:
    """The marker of a test's injected worker failure (DCGAN_FAIL_AT_STEP): the fault fires once per run."""
    return join(run, "ray", "fault-injected")


def rayjob_config(run: str, name: str) -> str:
    """The config a RayJob of this run ran (`dcgan.rayjob`): one file per RayJob, kept as a record."""
    return join(run, "rayjobs", f"{name}.yaml")


def ray(run: str) -> str:
    return join(run, "ray")
