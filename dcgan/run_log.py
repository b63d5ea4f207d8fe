"""Per-step training metrics as CSV and TensorBoard events, staged locally and published to the run URI
(layer: dcgan).

TensorBoard gets the scalars (losses, D(x), D(G(z)), images/s) and the fixed-z sample grid at every checkpoint, in
event files written by `dcgan.tfevents`. These are local files; for an s3:// run they are staged in a temporary
directory and uploaded at every checkpoint and at the end (metrics.csv also every PUBLISH_CSV_S, so a caller can
follow the run), and `runs/<name>/metrics/` holds the same files wherever the run lives. With MLFLOW_TRACKING_URI
set (and mlflow installed), the same scalars and grids also go to MLflow, in an MLflow run named after the run. An
evaluation adds its pictures and numbers at the evaluated checkpoint's step (`publish_evaluation`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from dcgan import run_layout, scratch
from dcgan.tfevents import EventWriter
from preprocessing import storage
from preprocessing.errors import InputError

COLUMNS = ("step", "loss_d", "loss_g", "d_x", "d_g_z", "images_per_s", "epoch")
PUBLISH_CSV_S = 30.0
MLFLOW_ENV = "MLFLOW_TRACKING_URI"

log = logging.getLogger(__name__)


def mlflow_client():
    """The mlflow module when MLFLOW_TRACKING_URI is set, None when not; a clear error when mlflow is missing."""
    if not os.environ.get(MLFLOW_ENV):
        return None
    try:
        import mlflow
    except ImportError:
        raise InputError(f"{MLFLOW_ENV} is set but mlflow is not installed here (pip install mlflow, or unset it)") \
            from None
    return mlflow


class RunLog:
    """Rank 0's metrics. `resume_step`: the step training continues from; rows logged after it (by a driver that
    died, or before Ray Train restarted the workers) are dropped, so a repeated interval is written once."""

    def __init__(self, run_uri: str, resume_step: int = 0):
        self.run_uri = run_uri
        self.remote = storage.is_s3(run_uri)
        if self.remote:
            self.dir = scratch.make(run_uri, "metrics")
            self._restore()
        else:
            self.dir = storage.local_path(run_uri) / "metrics"
            self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        _truncate_csv(self.csv_path, resume_step)
        self._csv = open(self.csv_path, "a", newline="")
        self._writer = csv.writer(self._csv)
        self._tb = EventWriter(self.dir / "tensorboard")
        self._published = time.monotonic()
        self._mlflow = mlflow_client()
        if self._mlflow is not None:
            self._mlflow.set_experiment("dcgan")
            self._mlflow.start_run(run_name=run_uri.rstrip("/").rsplit("/", 1)[-1])
            self._mlflow.log_param("run_uri", run_uri)

    def _restore(self) -> None:
        """A resumed remote run continues the CSV it already published."""
        uri = run_layout.metrics_csv(self.run_uri)
        if storage.exists(uri):
            storage.download_file(uri, self.dir / "metrics.csv")

    def log(self, step: int, values: dict[str, float]) -> None:
        self._writer.writerow([step] + [values.get(c, "") for c in COLUMNS[1:]])
        for k, v in values.items():
            self._tb.scalar(f"train/{k}", v, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({f"train/{k}": float(v) for k, v in values.items()}, step=step)
        if self.remote and time.monotonic() - self._published >= PUBLISH_CSV_S:
            self._csv.flush()
            storage.upload_file(self.csv_path, run_layout.metrics_csv(self.run_uri))
            self._published = time.monotonic()

    def image(self, step: int, grid: np.ndarray, tag: str = "samples/fixed_z") -> None:
        """A picture (H, W, C uint8, e.g. the fixed-z sample grid) at `step`."""
        self._tb.image(tag, grid, step)
        if self._mlflow is not None:
            self._mlflow.log_image(grid, key=tag.replace("/", "_"), step=step)

    def flush(self) -> None:
        self._csv.flush()
        self._tb.flush()
        self._published = time.monotonic()
        if self.remote:
            _publish(self.dir, run_layout.metrics(self.run_uri))

    def close(self) -> None:
        self.flush()
        self.release()

    def release(self) -> None:
        """Close the files and the MLflow run, and remove a remote run's scratch folder, publishing nothing more (a
        failed run's worker; `close` publishes first). A killed worker's folder is the next worker's to remove
        (`scratch.clear`)."""
        self._csv.close()
        self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


def parse_metrics(text: str, source: str = "metrics.csv") -> list[dict[str, float]]:
    """Rows of a metrics CSV by step, numbers parsed. A damaged history (a repeated header, a cut or garbled row, bytes
    that are not UTF-8, a step logged twice by two writers) is read as far as it makes sense, with one warning: the last
    row of a step wins, and rows come out in step order."""
    lines = text.replace("\x00", "").splitlines()  # NUL and over-long fields are csv's own errors: damaged rows
    header = _fields(lines[0]) if lines else None
    header = header or list(COLUMNS)
    by_step: dict[float, dict[str, float]] = {}
    damaged = 0
    for line in lines[1:]:
        fields = _fields(line)
        if fields is None:
            damaged += 1
            continue
        if not fields:
            continue
        try:
            if len(fields) != len(header):
                raise ValueError("wrong number of fields")
            row = {k: float(v) for k, v in zip(header, fields) if v not in ("", None)}
            step = row["step"]
        except (ValueError, KeyError):
            damaged += 1
            continue
        damaged += step in by_step
        by_step[step] = row
    if damaged:
        log.warning("%s: %d damaged or repeated rows skipped (the last row of each step is kept)", source, damaged)
    return [by_step[k] for k in sorted(by_step)]


def _fields(line: str) -> list[str] | None:
    """One CSV line's fields; None where csv refuses it (a field over its size limit)."""
    try:
        return next(csv.reader([line]), [])
    except csv.Error:
        return None


@contextlib.contextmanager
def opened(run_uri: str, resume_step: int, enabled: bool = True) -> Iterator[RunLog | None]:
    """A `RunLog` for the block (None where not `enabled`: ranks but 0): closed (published) when the block ends,
    released (nothing more published) when it raises."""
    run_log = RunLog(run_uri, resume_step) if enabled else None
    try:
        yield run_log
    except BaseException:
        if run_log is not None:
            run_log.release()
        raise
    if run_log is not None:
        run_log.close()


def _truncate_csv(path: Path, resume_step: int) -> None:
    """The CSV as one header and the rows up to `resume_step`, rewritten whole (a temporary file and a rename)."""
    rows = parse_metrics(path.read_text(errors="replace"), str(path)) if path.exists() else []
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            if row["step"] <= resume_step:
                writer.writerow([_cell(row.get(c)) for c in COLUMNS])
    os.replace(tmp, path)


def _cell(value: float | None) -> str | int | float:
    if value is None:
        return ""
    return int(value) if float(value).is_integer() else value


def read_metrics(run_uri: str) -> list[dict[str, float]]:
    """The run's metrics.csv as a list of rows (numbers parsed; a damaged history, bytes that are not text included,
    is read with one warning)."""
    uri = run_layout.metrics_csv(run_uri)
    return parse_metrics(storage.read_bytes(uri).decode("utf-8", errors="replace"), uri)


def publish_evaluation(run_uri: str, step: int, pictures: dict[str, bytes], scalars: dict[str, float]) -> None:
    """An evaluation's pictures (PNG bytes by name) and numbers in the run's TensorBoard at `step`: tags
    `eval/<picture>` and `eval/<suite>/<metric>`, in an event file of their own beside training's."""
    remote = storage.is_s3(run_uri)
    with tempfile.TemporaryDirectory(prefix="dcgan-eval-tb-") as tmp:
        logdir = Path(tmp) if remote else storage.local_path(run_layout.tensorboard(run_uri))
        writer = EventWriter(logdir, suffix=".eval")
        try:
            for name, png in pictures.items():  # the report's PNG files, as they are
                writer.png(f"eval/{Path(name).stem}", png, step)
            for tag, value in scalars.items():
                writer.scalar(tag, value, step)
        finally:
            writer.close()
        if remote:
            _publish(Path(tmp), run_layout.tensorboard(run_uri))


def _publish(staged: Path, uri: str) -> None:
    """Upload every file staged under `staged` to the same relative path under `uri` (an s3:// run's metrics)."""
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(uri, path.relative_to(staged).as_posix()))
