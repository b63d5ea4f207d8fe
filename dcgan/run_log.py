"""Per-step training metrics as CSV and TensorBoard events, staged locally and published to the run URI.

TensorBoard writes local files; for an s3:// run they are staged in a temporary directory and uploaded at every
checkpoint and at the end, so `runs/<name>/metrics/` holds the same files wherever the run lives.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from preprocessing import storage

COLUMNS = ("step", "loss_d", "loss_g", "d_x", "d_g_z", "images_per_s", "epoch")


class RunLog:
    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.remote = storage.is_s3(run_uri)
        if self.remote:
            self._tmp = tempfile.TemporaryDirectory(prefix="dcgan-metrics-")
            self.dir = Path(self._tmp.name)
            self._restore()
        else:
            self.dir = storage.local_path(run_uri) / "metrics"
            self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        new = not self.csv_path.exists()
        self._csv = open(self.csv_path, "a", newline="")
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(COLUMNS)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def _restore(self) -> None:
        """A resumed remote run continues the CSV it already published."""
        uri = storage.join(self.run_uri, "metrics", "metrics.csv")
        if storage.exists(uri):
            storage.download_file(uri, self.dir / "metrics.csv")

    def log(self, step: int, values: dict[str, float]) -> None:
        self._writer.writerow([step] + [values.get(c, "") for c in COLUMNS[1:]])
        for k, v in values.items():
            self._tb.add_scalar(f"train/{k}", v, step)

    def flush(self) -> None:
        self._csv.flush()
        self._tb.flush()
        if self.remote:
            for p in sorted(self.dir.rglob("*")):
                if p.is_file():
                    storage.upload_file(p, storage.join(self.run_uri, "metrics", p.relative_to(self.dir).as_posix()))

    def close(self) -> None:
        self.flush()
        self._csv.close()
        self._tb.close()
        if self.remote:
            self._tmp.cleanup()


def read_metrics(run_uri: str) -> list[dict[str, float]]:
    """The run's metrics.csv as a list of rows (numbers parsed)."""
    text = storage.read_text(storage.join(run_uri, "metrics", "metrics.csv"))
    rows = []
    for row in csv.DictReader(text.splitlines()):
        rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows
