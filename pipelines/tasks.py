"""The steps every flow shares: build a dataset, train a run, evaluate it.

Each step is one Prefect task used by several flows (build-faces and build-lsun call the same build task with a
different kind; dcgan-pipeline chains the same three tasks the single-stage flows run). Each task:
- retries transient faults (storage hiccups, a lost Ray node, a dropped connection) with backoff, but never bad
  input, which fails the same way every time (`retry_transient`);
- skips work whose output is already complete, and says so in the run log, so a re-run of a pipeline only does
  what is missing;
- publishes what a person wants to see in the Prefect UI (`pipelines.artifacts`).

The heavy packages (`preprocessing.build`, `dcgan.train`, `dcgan.evaluation`) are imported inside the tasks, so this
module, the flows and `prefect deploy` load quickly and without them.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from dcgan.config import Config, EvalConfig
from preprocessing.config import BuildConfig, DedupConfig
from preprocessing.shards import DatasetError

# Backoff between the attempts of a task that failed on a transient fault.
RETRY_DELAYS = [10, 60, 300]


def is_bad_input(exc: BaseException) -> bool:
    """Bad input fails the same way every time: a known fault (`UserError`) unless it may pass (`TransientError`,
    such as an unreachable endpoint: boto3 has already retried throttling and 5xx by then). A ValueError or
    TypeError (pydantic's validation errors among them) fails the same way on a retry too."""
    from preprocessing.errors import TransientError, UserError

    if isinstance(exc, TransientError):
        return False
    return isinstance(exc, (UserError, ValueError, TypeError))


def retry_transient(task_: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect `retry_condition_fn`: retry unless the task failed on bad input."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify, never swallow: Prefect keeps the failure
        return not is_bad_input(exc)
    return True


_RETRYING = dict(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient)


# --------------------------------------------------------------------------------------------------------- build


def same_build(manifest: dict[str, Any], build: BuildConfig, dedup: DedupConfig | None) -> bool:
    """Whether a committed dataset was built from these parameters. The manifest records the BuildConfig dump (less
    the fields that change no output byte, such as `overwrite`) and the DedupConfig dump (None when not used)."""
    recorded = dict(manifest.get("params") or {})
    recorded_dedup = recorded.pop("dedup", None)
    want = build.model_dump(mode="json")
    if not recorded or any(k not in want or want[k] != v for k, v in recorded.items()):
        return False
    want_dedup = dedup.model_dump(mode="json") if dedup is not None and dedup.enabled else None
    return recorded_dedup == want_dedup


@task(name="build-dataset", task_run_name="build-{build.kind}", **_RETRYING)
def build_dataset(build: BuildConfig, out: str, dedup: DedupConfig | None = None) -> dict[str, Any]:
    """Build (or keep) the dataset at `out`; returns its manifest with `skipped` set when nothing was done."""
    from preprocessing import shards

    from pipelines import artifacts

    logger = get_run_logger()
    if not build.overwrite:
        try:
            manifest = shards.read_manifest(out)
        except DatasetError:
            manifest = None
        if manifest is not None and same_build(manifest, build, dedup):
            logger.info("Skipping build-%s: %s is already complete with the same parameters (%d rows)",
                        build.kind, out, manifest["counts"]["rows"])
            return {**manifest, "uri": out, "skipped": True}

    from preprocessing.build import build_dataset as build_fn

    logger.info("Building a %s dataset at %dpx from %s into %s", build.kind, build.resolution, build.input, out)
    manifest = build_fn(build, out, dedup=dedup, progress=False)
    artifacts.dataset_summary(out, manifest)
    logger.info("Dataset %s: %d rows, %d rejected, %d duplicates removed", out, manifest["counts"]["rows"],
                manifest["counts"]["rejected"], manifest["counts"]["duplicates_removed"])
    return {**manifest, "uri": out, "skipped": False}


# --------------------------------------------------------------------------------------------------------- train


@task(name="train", task_run_name="train-{config.name}", **_RETRYING)
def train_run(config: Config) -> dict[str, Any]:
    """Train `config.run_uri` to `config.train.steps`: a Ray Job on a cluster, or in this process on a local Ray.

    A retry resumes from the run's newest complete checkpoint, so a lost node costs at most `checkpoint_every`
    steps.
    """
    from dcgan import checkpoints
    from dcgan.train import run_summary

    from pipelines import artifacts, ray_jobs

    logger = get_run_logger()
    done = checkpoints.latest_step(config.run_uri)
    if done is not None and done >= config.train.steps:
        logger.info("Skipping train: %s already has a checkpoint at step %d >= train.steps %d",
                    config.run_uri, done, config.train.steps)
        return {**run_summary(config, done), "skipped": True}

    address = ray_jobs.cluster_address(config)
    if address:
        logger.info("Training %s on the Ray cluster at %s (from step %s to %d)", config.run_uri, address,
                    done or 0, config.train.steps)
        ray_jobs.run_training_job(config, address, logger)
        step = checkpoints.latest_step(config.run_uri)
        if step is None or step < config.train.steps:
            raise RuntimeError(f"the Ray job succeeded but {config.run_uri} has no checkpoint at step "
                               f"{config.train.steps} (latest: {step})")
        result = run_summary(config, step)
    else:
        from dcgan.train import train

        logger.info("Training %s in this process on a local Ray (from step %s to %d)", config.run_uri, done or 0,
                    config.train.steps)
        result = train(config)
    artifacts.training_summary(config, result)
    logger.info("Run %s at step %d; samples %s", result["run"], result["step"], result["samples"])
    return {**result, "skipped": False}


# ------------------------------------------------------------------------------------------------------ evaluate


@task(name="evaluate", task_run_name="evaluate-{run}", **_RETRYING)
def evaluate_run(run: str, evaluate: EvalConfig | None = None, data: str | None = None) -> dict[str, Any]:
    """Run the evaluation suites on the run's newest checkpoint; writes `<run>/eval/` and returns the metrics."""
    from dcgan.evaluation.report import evaluate as evaluate_fn
    from preprocessing import storage

    from pipelines import artifacts

    logger = get_run_logger()
    logger.info("Evaluating %s (suites: %s)", run, ", ".join((evaluate or EvalConfig()).suites))
    metrics = evaluate_fn(run, evaluate, data_uri=data)
    report = storage.join(run, "eval", "report.md")
    artifacts.evaluation_summary(run, metrics)
    logger.info("Evaluation report: %s", report)
    return {"run": run, "report": report, "html": storage.join(run, "eval", "report.html"), "metrics": metrics}
