"""The steps every flow shares: build a dataset, train a run, evaluate it (layer: pipelines).

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

import contextlib
import logging
from typing import Any, Iterator

from prefect import get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from dcgan import stages
from dcgan.config import Config
from dcgan.stages import StageCall
from preprocessing import settings
from preprocessing.errors import InputError, classify

# Backoff between the attempts of a task that failed on a transient fault (the README's 10 s, 60 s, 300 s). A bad
# DCGAN_RETRY_DELAYS_S is not an import traceback in the worker: the stage reports it in one line when it starts
# (`stages.run` checks every setting), and that bad input is never retried.
try:
    RETRY_DELAYS = settings.retry_delays()
except InputError:
    RETRY_DELAYS = list(settings.SECONDS_LISTS[settings.RETRY_DELAYS_ENV][0])


def retry_transient(task_: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect `retry_condition_fn`: retry what another attempt may change (`preprocessing.errors.classify`)."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify, never swallow: Prefect keeps the failure
        return classify(exc).worth_retrying
    return True


_RETRYING = dict(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient)


# ---------------------------------------------------------------------------------------------------- the steps


class _ToRunLog(logging.Handler):
    """The project's own log lines (`preprocessing.*`, `dcgan.*`: a build's summary, a resume) in the run's log."""

    def __init__(self, logger: Any):
        super().__init__(logging.INFO)
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def _project_logs_to(logger: Any) -> Iterator[None]:
    handler = _ToRunLog(logger)
    saved = {}
    for name in ("preprocessing", "dcgan"):
        project = logging.getLogger(name)
        saved[name] = (project.level, project.propagate)
        project.addHandler(handler)
        project.setLevel(logging.INFO)
        project.propagate = False  # the run logger prints it already
    try:
        yield
    finally:
        for name, (level, propagate) in saved.items():
            project = logging.getLogger(name)
            project.removeHandler(handler)
            project.setLevel(level)
            project.propagate = propagate


def _run(call: StageCall) -> dict[str, Any]:
    """A stage where the configuration says (here, or a Ray Job whose log streams into this run's log), with its
    progress as Prefect progress artifacts and the project's log lines in the run's log."""
    from pipelines import artifacts

    logger = get_run_logger()
    logger.info("%s runs %s", call.stage, stages.where(call))
    with _project_logs_to(logger), artifacts.progress_artifacts(stages.REGISTRY[call.stage].writes(call)):
        return stages.run(call, emit=logger.info)


@task(name="build-dataset", task_run_name="{stage}", **_RETRYING)
def build_stage(config: Config, stage: str) -> dict[str, Any]:
    """Build (or keep, when complete with the same parameters) the dataset `config.data_uri` from `config.build`."""
    from preprocessing.shards import read_manifest

    from pipelines import artifacts

    result = _run(StageCall(stage, config))
    artifacts.dataset_summary(result["dataset"], read_manifest(result["dataset"]))
    get_run_logger().info("dataset %s: %d rows, %d rejected, %d duplicates removed%s", result["dataset"],
                          result["counts"]["rows"], result["counts"]["rejected"],
                          result["counts"]["duplicates_removed"], " (already built: skipped)" if result["skipped"]
                          else "")
    return result


@task(name="train", task_run_name="train-{config.name}", **_RETRYING)
def train_stage(config: Config) -> dict[str, Any]:
    """Train `config.run_uri` to `config.train.steps`. A retry resumes from the run's newest valid checkpoint, so a
    lost node costs at most `checkpoint_every` steps; a finished run is not sent anywhere (`dcgan.stages.run`)."""
    from pipelines import artifacts

    result = _run(StageCall("train", config))
    if not result["skipped"]:
        artifacts.training_summary(config, result)
    get_run_logger().info("Run %s at step %d; samples %s", result["run"], result["step"], result["samples"])
    return result


@task(name="evaluate", task_run_name="evaluate-{config.name}", **_RETRYING)
def evaluate_stage(config: Config) -> dict[str, Any]:
    """Run the evaluation suites of `config.evaluate` on the newest checkpoint of `config.run_uri`."""
    from pipelines import artifacts

    result = _run(StageCall("evaluate", config))
    artifacts.evaluation_summary(result["run"], result["metrics"], result.get("html"))
    get_run_logger().info("Evaluation report: %s", result["report"])
    return result
