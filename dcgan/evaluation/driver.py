"""`evaluate`: the chosen suites on one checkpoint of a run, kept as the run's evaluation history (layer: dcgan).

Each evaluated checkpoint gets its own folder, <run>/eval/step-NNNNNNN/ (report.md, report.html, metrics.json and the
pictures), and one line in <run>/eval/metrics.jsonl (as stylegan2-ada's metric-*.jsonl), so a run's quality can be
followed over its checkpoints; <run>/eval/report.md (and .html) lists them, newest first. An evaluation already done
for a step with the same suites and inputs is not done again (`force` to redo it).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from typing import Any

import torch

from dcgan import run_layout
from dcgan.config import EvalConfig
from dcgan.evaluation import features
from dcgan.evaluation.report import _jsonable, render_html, render_history, render_markdown
from dcgan.evaluation.inputs import already_evaluated, check_suites, evaluation_inputs
from dcgan.evaluation.suites import RUNNERS, Context, NotRun, Section, preflight
from preprocessing import shards, storage
from preprocessing.progress import Progress

log = logging.getLogger(__name__)


def evaluate(
    run_uri: str,
    cfg: EvalConfig | None = None,
    data_uri: str | None = None,
    *,
    arithmetic: str | None = None,
    boxes: str | None = None,
    step: int | None = None,
    device: str | torch.device | None = None,
    fid_samples: int = 10_000,
    force: bool = False,
) -> dict:
    """Evaluate a run's checkpoint (the newest valid one unless `step`); returns the metrics written to
    eval/step-NNNNNNN/metrics.json. `cfg` defaults to the run's own `evaluate` section, `data_uri` to its dataset."""
    from dcgan.checkpoints import load_models

    device = features.resolve_device(device)
    loaded = load_models(run_uri, step=step, device=device)
    cfg = cfg or loaded.config.evaluate
    suites = check_suites(list(cfg.suites))
    preflight(cfg, suites, arithmetic, boxes)
    if data_uri is None and shards.is_complete(loaded.config.data_uri):
        data_uri = loaded.config.data_uri
    out = run_layout.eval_step(run_uri, loaded.step)
    inputs = evaluation_inputs(cfg, data_uri, arithmetic, boxes)
    done = already_evaluated(run_uri, loaded.step, inputs)
    if done is not None and not force:
        log.info("step %d of %s is already evaluated with these suites: %s", loaded.step, run_uri, out)
        return {**done, "skipped": True}

    storage.check_writable(out)
    ctx = Context(run_uri, out, loaded.generator, loaded.discriminator, loaded.step, cfg, data_uri, arithmetic, boxes,
                  device, fid_samples)
    sections, metrics = [], {"run": run_uri, "step": loaded.step, "data": data_uri, "inputs": inputs, "suites": {}}
    shown = Progress("evaluate", len(suites), "suites")
    for name in suites:
        shown.update(len(sections), note=name)
        title, runner = RUNNERS[name]
        section = Section(title)
        t0 = time.perf_counter()
        try:
            runner(ctx, section)
        except NotRun as why:
            section.status = f"not run: {why}"
        section.metrics = _jsonable(section.metrics)
        sections.append(section)
        metrics["suites"][name] = {"status": section.status, "seconds": round(time.perf_counter() - t0, 2),
                                   "images": [n for n, _ in section.images], **section.metrics}
        log.debug("%s: %s (%.1fs)", name, section.status, time.perf_counter() - t0)  # the report lists them
    shown.update(len(sections), note="writing the report")
    shown.close()
    metrics["evaluated_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = f"Evaluation of {loaded.config.name}, step {loaded.step}"
    m = loaded.config.model
    header = [f"run: {run_uri}", f"dataset: {data_uri or '(none)'}", f"device: {device}",
              f"model: {m.resolution}x{m.resolution}, z {m.z_dim}-d {m.z_dist}, "
              f"D features {features.feature_dim(loaded.discriminator)}-d"]
    storage.write_text(run_layout.eval_report(out), render_markdown(title, header, sections))
    storage.write_text(run_layout.eval_report(out, html=True), render_html(title, header, sections))
    storage.write_json(run_layout.eval_metrics(out), metrics)
    _record(run_uri, loaded.config.name, metrics)
    _to_tensorboard(run_uri, loaded.step, out, sections, metrics)
    return {**metrics, "skipped": False}


def _to_tensorboard(run_uri: str, step: int, out: str, sections: list[Section], metrics: dict) -> None:
    """The report's pictures and every numeric metric in the run's TensorBoard, beside training's curves."""
    from dcgan.run_log import publish_evaluation

    pictures = {name: storage.read_bytes(run_layout.eval_file(out, name)) for s in sections if s.status == "ok"
                for name, _ in s.images if storage.exists(run_layout.eval_file(out, name))}
    scalars = {f"eval/{suite}/{k}": float(v) for suite, m in metrics["suites"].items() for k, v in m.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds"}
    publish_evaluation(run_uri, step, pictures, scalars)


def evaluate_every_checkpoint(run_uri: str, cfg: EvalConfig | None = None, **kwargs: Any) -> list[dict]:
    """Evaluate each valid checkpoint of the run not yet evaluated with these inputs, oldest first; returns the new
    evaluations. `evaluate` alone decides what "already evaluated" means."""
    from dcgan import checkpoints

    done = [evaluate(run_uri, cfg, step=s, **kwargs) for s in checkpoints.valid_steps(run_uri)]
    return [m for m in done if not m.get("skipped")]


def _record(run_uri: str, name: str, metrics: dict) -> None:
    """Append the evaluation to eval/metrics.jsonl (one line per evaluation) and rewrite the index pages."""
    history_uri = run_layout.eval_history(run_uri)
    lines = storage.read_text(history_uri).splitlines() if storage.exists(history_uri) else []
    entry = {"step": metrics["step"], "evaluated_at": metrics["evaluated_at"],
             "suites": {k: {f: v for f, v in s.items() if f not in ("images",)} for k, s in metrics["suites"].items()}}
    lines.append(json.dumps(entry, sort_keys=True))
    storage.write_text(history_uri, "\n".join(lines) + "\n")
    history = [json.loads(ln) for ln in lines if ln.strip()]
    md, page = render_history(f"Evaluations of {name}", run_uri, history)
    storage.write_text(run_layout.eval_index(run_uri), md)
    storage.write_text(run_layout.eval_index(run_uri, html=True), page)
