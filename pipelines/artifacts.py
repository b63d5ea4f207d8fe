"""What a person wants to look at in the Prefect UI: progress while a stage runs, then tables and pictures (layer:
pipelines).

Every artifact has a key derived from the dataset or run, so the Artifacts page keeps one history per dataset/run.
Pictures are embedded in Markdown as data URIs (the UI cannot fetch file:// or private s3:// objects), with the
object's URI written beside them; pictures too large to embed are linked instead.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import re
import threading
from typing import Any, Iterator
from uuid import UUID

from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from preprocessing import dataset_layout, progress, storage

MAX_EMBED_BYTES = 2_000_000


def artifact_key(prefix: str, uri: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) naming the dataset or run."""
    tail = "-".join(str(uri).rstrip("/").split("/")[-2:])
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{tail}".lower())).strip("-")[:100]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _flatten(v, f"{name}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((name, v))
    return rows


def picture(uri: str, title: str, key: str) -> None:
    """Show a PNG (local or s3://) in the UI: embedded when small, else a link to it."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError:
        return
    if len(data) <= MAX_EMBED_BYTES:
        b64 = base64.b64encode(data).decode("ascii")
        create_markdown_artifact(f"### {title}\n\n![{title}](data:image/png;base64,{b64})\n\n`{uri}`", key=key,
                                 description=title)
    else:
        create_link_artifact(uri, link_text=title, key=key, description=title)


@contextlib.contextmanager
def progress_artifacts(scope: str) -> Iterator[None]:
    """While the block runs, every step's progress (`preprocessing.progress`: build chunks, dedup phases, training
    steps, evaluation suites, also those of a Ray Job, read from its log) is a Prefect progress artifact of the
    current task run, keyed `progress-<step>-<scope>` and updated as the step advances."""
    ids: dict[str, UUID] = {}
    lock = threading.Lock()
    context = contextvars.copy_context()  # updates may come from other threads: keep them in this task run

    def show(u: progress.Update) -> None:
        text = f"{u.what}: {u.done}/{u.total} {u.unit}" + (f", ETA {progress.format_seconds(u.eta_s)}"
                                                           if u.eta_s is not None and u.done < u.total else "")
        with lock:
            if u.what in ids:
                context.run(update_progress_artifact, ids[u.what], u.percent, description=text)
            else:
                ids[u.what] = context.run(create_progress_artifact, u.percent,
                                          key=artifact_key(f"progress-{u.what}", scope), description=text)

    with progress.listen(show):
        yield


def dataset_summary(uri: str, manifest: dict[str, Any]) -> None:
    """Counts, rejects by reason and duplicates removed of a dataset build."""
    counts = manifest.get("counts", {})
    rows = [
        {"field": "dataset", "value": uri},
        {"field": "kind", "value": manifest.get("kind")},
        {"field": "resolution", "value": manifest.get("resolution")},
        {"field": "inputs", "value": counts.get("inputs")},
        {"field": "rows", "value": counts.get("rows")},
        {"field": "rejected", "value": counts.get("rejected")},
        {"field": "duplicates removed", "value": counts.get("duplicates_removed")},
        {"field": "shards", "value": len(manifest.get("shards", []))},
        {"field": "dedup method", "value": (manifest.get("dedup") or {}).get("method")},
    ]
    for reason, n in (manifest.get("rejects", {}).get("by_reason") or {}).items():
        rows.append({"field": f"rejected: {reason}", "value": n})
    create_table_artifact(rows, key=artifact_key("dataset", uri), description=f"Dataset build {uri}")
    collisions = dataset_layout.dedup_collisions(uri)
    if storage.exists(collisions):
        picture(collisions, "Duplicate groups found by the semantic hash", artifact_key("collisions", uri))


def training_summary(cfg: Any, result: dict[str, Any]) -> None:
    """Steps, losses, throughput and checkpoint/sample URIs of a training run, and its latest sample grid."""
    rows = [
        {"field": "run", "value": result.get("run")},
        {"field": "step", "value": result.get("step")},
        {"field": "checkpoint", "value": result.get("checkpoint")},
        {"field": "samples", "value": result.get("samples")},
        {"field": "workers", "value": cfg.cluster.workers},
        {"field": "batch size", "value": cfg.train.batch_size},
    ]
    shown = {r["field"] for r in rows}
    rows += [{"field": k, "value": _fmt(v)} for k, v in _flatten(result.get("metrics") or {}) if k not in shown]
    create_table_artifact(rows, key=artifact_key("training", result["run"]), description=f"Training {result['run']}")
    if result.get("samples"):
        picture(result["samples"], f"Fixed-z samples at step {result.get('step')}",
                artifact_key("samples", result["run"]))


def evaluation_summary(run: str, metrics: dict[str, Any] | None, report: str | None) -> None:
    """The evaluation's metrics as a table, and a link to its report (`report`: the step's report.html)."""
    rows = [{"metric": k, "value": _fmt(v)} for k, v in _flatten(metrics or {})]
    create_table_artifact(rows, key=artifact_key("evaluation", run), description=f"Evaluation of {run}")
    if report is None:
        return
    create_link_artifact(report, link_text="evaluation report", key=artifact_key("report", run),
                         description=f"Evaluation report of {run}")
