"""The stages a user runs and where each one runs (layer: dcgan).

`build-lsun`, `build-faces`, `dedup`, `train` and `evaluate` are described the same way by the `dcgan` CLI and by the
Prefect tasks: a `StageCall`, the resolved configuration plus the few options that are not configuration (a dedup's
source and destination, an evaluation's step). `run` asks `preprocessing.compute` where work runs: in this process (a
local Ray, or joining the cluster this process is on), or as a Ray Job that runs the same `dcgan <stage>` command line
on the cluster, with the configuration in the job's environment. Both give the caller the same result: a small JSON
dict (a job prints it as its last line, `--json`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dcgan import run_layout
from dcgan.config import ENV_PREFIX, Config, dump_config
from preprocessing import compute, progress, settings, shards, storage
from preprocessing.errors import FAULT_KEY, InputError

log = logging.getLogger(__name__)

FLAG_OPTIONS = ("overwrite", "arithmetic", "boxes", "step", "device", "every_checkpoint", "force")  # options a job's command line carries
RESULT_KEY = "dcgan_result"   # the result line a job prints: {"dcgan_result": {...}}
JOB_CONFIG_ENV = "DCGAN_JOB_CONFIG"  # a job's resolved config (YAML), read with `--config env:DCGAN_JOB_CONFIG`


@dataclass
class StageCall:
    """One stage to run: `config` is complete and resolved; `options` are what is not configuration."""

    stage: str
    config: Config
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in REGISTRY:
            raise InputError(f"unknown stage {self.stage!r}; stages: {', '.join(REGISTRY)}")

    def command(self, config_file: str = "config.yaml") -> list[str]:
        """The `dcgan` command line that runs this call from `config_file` (what a Ray Job runs)."""
        argv = ["dcgan", self.stage, *REGISTRY[self.stage].arguments(self), "--config", config_file, "--json"]
        for name, value in self.options.items():
            if name not in FLAG_OPTIONS or value in (None, False):
                continue
            flag = "--" + name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        return argv


Emit = Callable[[str], None]


def run(call: StageCall, emit: Emit = log.info) -> dict[str, Any]:
    """Run a stage where the configuration says (see preprocessing.compute); returns its result dict. "Is it done?"
    is asked once, first: a stage with nothing to do is not sent anywhere."""
    settings.check()  # a Prefect task's process reads the settings here: a bad one is a line, before anything runs
    from dcgan import checkpoints  # light: torch only where a checkpoint is read

    checkpoints.forget_told()  # a flow's stages each tell of a corrupt checkpoint they meet
    stage = REGISTRY[call.stage]
    done = stage.done(call)
    if done is not None:
        why, result = done
        emit(f"skipping {call.stage}: {why}")
        return {"stage": call.stage, **result, "skipped": True}
    if _on_its_own_cluster(call):
        from dcgan import rayjob

        return rayjob.run(call, emit, job_config(call.config), lambda logs: parse_result(logs) or stored_result(call))
    where = compute.placement(call.config.cluster.address)
    if where.kind == "jobs":
        return run_as_job(call, where.address, emit)
    return run_here(call, emit)


def _on_its_own_cluster(call: StageCall) -> bool:
    """A training with `cluster.submit: rayjob` runs on a cluster made for it (dcgan.rayjob)."""
    return call.stage == "train" and call.config.cluster.submit == "rayjob"


def where(call: StageCall) -> str:
    """Where `run` sends the call, in words: "<stage> runs " + this (a Prefect task's first log line)."""
    if _on_its_own_cluster(call):
        return "on a KubeRay RayJob (a cluster of its own)"
    place = compute.placement(call.config.cluster.address)
    if place.kind != "jobs" and not REGISTRY[call.stage].on_ray:
        return "in this process (it sends no Ray task)"
    return f"on {place}"


def run_here(call: StageCall, emit: Emit = log.info) -> dict[str, Any]:
    """Run a stage in this process, on a local Ray or the cluster this process is on. A stage on Ray starts or joins
    it itself (`compute.connect(cluster.address)`), once its inputs and outputs are checked: a missing dataset, a
    location it may not write or storage it cannot reach is one line before a local Ray's ~5 s start (or a
    cluster's join); the evaluation computes in its own process and starts no Ray."""
    return {"stage": call.stage, "skipped": False, **REGISTRY[call.stage].here(call, emit)}


# ------------------------------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class Stage:
    """A stage as one record: what every front end asks of it is answered here, once."""

    name: str
    here: Callable[[StageCall, Emit], dict[str, Any]]               # run it in this process
    done: Callable[[StageCall], tuple[str, dict[str, Any]] | None]  # (why, stored result) if nothing is left to do
    stored: Callable[[StageCall], dict[str, Any]]                   # its result as storage says (a job's log was lost)
    writes: Callable[[StageCall], str]                              # where its outputs go (a Prefect task's scope)
    arguments: Callable[[StageCall], list[str]] = lambda call: []   # its command line's positional arguments
    build_kind: str | None = None                                   # a build's `build.kind`
    on_ray: bool = True                                             # its work runs as Ray tasks


def dataset_result(uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a build or dedup reports: where the dataset is and its figures (the manifest holds the rest)."""
    return {"dataset": uri, "kind": manifest["kind"], "resolution": manifest["resolution"],
            "counts": manifest["counts"], "content_hash": manifest.get("content_hash"),
            "rejects": (manifest.get("rejects") or {}).get("by_reason", {}), "shards": len(manifest["shards"])}


# build-lsun, build-faces


def _build_config(call: StageCall):
    from preprocessing.build import require_input

    require_input(call.config.build)
    return call.config.build.model_copy(update={"kind": REGISTRY[call.stage].build_kind})


def _build(call: StageCall, emit: Emit) -> dict[str, Any]:
    from preprocessing.build import build_dataset

    cfg = call.config
    return dataset_result(cfg.data_uri, build_dataset(_build_config(call), cfg.data_uri, dedup=cfg.dedup,
                                                      progress=call.options.get("progress", True),
                                                      cluster=cfg.cluster))


def _build_done(call: StageCall) -> tuple[str, dict[str, Any]] | None:
    from preprocessing.build import already_built

    build, cfg = _build_config(call), call.config
    manifest = None if build.overwrite else already_built(cfg.data_uri, build, cfg.dedup)
    if manifest is None:
        return None
    return (f"{cfg.data_uri} is already complete with the same parameters ({manifest['counts']['rows']} rows)",
            dataset_result(cfg.data_uri, manifest))


def _build_stored(call: StageCall) -> dict[str, Any]:
    return dataset_result(call.config.data_uri, shards.read_manifest(call.config.data_uri))


# dedup


def _dedup_result(call: StageCall, manifest: dict[str, Any]) -> dict[str, Any]:
    o, info = call.options, manifest["dedup"]
    return {**dataset_result(o["out"], manifest), "source": o["source"],
            "report": storage.join(o["out"], info["report"]), "picture": storage.join(o["out"], info["picture"])}


def _dedup(call: StageCall, emit: Emit) -> dict[str, Any]:
    from preprocessing.dedup.dataset import dedup_dataset

    o = call.options
    return _dedup_result(call, dedup_dataset(o["source"], o["out"], call.config.dedup,
                                             overwrite=bool(o.get("overwrite")), cluster=call.config.cluster))


def _dedup_done(call: StageCall) -> tuple[str, dict[str, Any]] | None:
    from preprocessing.dedup.dataset import already_deduplicated

    o = call.options
    manifest = None if o.get("overwrite") else already_deduplicated(o["source"], o["out"], call.config.dedup)
    if manifest is None:
        return None
    return (f"{o['out']} is already {o['source']} de-duplicated with these settings "
            f"({manifest['counts']['rows']} rows)", _dedup_result(call, manifest))


# train


def _train(call: StageCall, emit: Emit) -> dict[str, Any]:
    from dcgan.train import train

    return train(call.config)


def _train_done(call: StageCall) -> tuple[str, dict[str, Any]] | None:
    from dcgan import checkpoints
    from dcgan.run_state import finished_step, run_summary, stored_config

    cfg = call.config
    stored = stored_config(cfg.run_uri)
    if stored is not None and stored.model != cfg.model:
        return None  # not this run's networks: the trainer's preflight says so in one line
    step = finished_step(cfg)
    if step is None:
        return None
    if checkpoints.surplus_steps(cfg.run_uri, cfg.train.keep_checkpoints, step):
        return None  # older checkpoints left by workers whose driver died: the trainer removes them, under the lease
    return (f"{cfg.run_uri} already has a checkpoint at step {step} >= train.steps {cfg.train.steps}",
            run_summary(cfg, step))


def _train_stored(call: StageCall) -> dict[str, Any]:
    from dcgan.run_state import stored_summary

    return stored_summary(call.config)


# evaluate


def _evaluation_data(call: StageCall) -> str | None:
    return call.config.data_uri if shards.is_complete(call.config.data_uri) else None


def _evaluation_result(call: StageCall, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    run, out = call.config.run_uri, run_layout.eval_step(call.config.run_uri, step)
    return {"run": run, "step": step, "report": run_layout.eval_report(out),
            "html": run_layout.eval_report(out, html=True), "index": run_layout.eval_index(run), "metrics": metrics}


def _evaluate(call: StageCall, emit: Emit) -> dict[str, Any]:
    from dcgan.evaluation.driver import evaluate, evaluate_every_checkpoint

    cfg, o = call.config, call.options
    kwargs = dict(data_uri=_evaluation_data(call), arithmetic=o.get("arithmetic"), boxes=o.get("boxes"),
                  device=o.get("device"), force=bool(o.get("force")))
    if o.get("every_checkpoint"):
        done = evaluate_every_checkpoint(cfg.run_uri, cfg.evaluate, **kwargs)
        emit(f"evaluated {len(done)} checkpoint(s) of {cfg.run_uri} that had no evaluation with these suites")
        if not done:
            return {"run": cfg.run_uri, "report": run_layout.eval_index(cfg.run_uri), "evaluated": [],
                    "metrics": None}
        metrics = done[-1]
    else:
        metrics = evaluate(cfg.run_uri, cfg.evaluate, step=o.get("step"), **kwargs)
    return {**_evaluation_result(call, metrics["step"], metrics), "skipped": bool(metrics.get("skipped"))}


def _evaluate_done(call: StageCall) -> tuple[str, dict[str, Any]] | None:
    from dcgan import checkpoints
    from dcgan.evaluation.inputs import already_evaluated, evaluation_inputs

    cfg, o = call.config, call.options
    if o.get("force") or o.get("every_checkpoint"):
        return None
    step = o.get("step") or checkpoints.latest_step(cfg.run_uri)
    if step is None:
        return None  # no checkpoint: the evaluation itself says so
    inputs = evaluation_inputs(cfg.evaluate, _evaluation_data(call), o.get("arithmetic"), o.get("boxes"))
    metrics = already_evaluated(cfg.run_uri, step, inputs)
    if metrics is None:
        return None
    return (f"step {step} of {cfg.run_uri} is already evaluated with these suites (--force to redo it)",
            _evaluation_result(call, step, metrics))


def _evaluate_stored(call: StageCall) -> dict[str, Any]:
    from dcgan import checkpoints

    cfg = call.config
    step = call.options.get("step") or checkpoints.latest_step(cfg.run_uri)
    return _evaluation_result(call, step, storage.read_json(run_layout.eval_metrics(run_layout.eval_step(
        cfg.run_uri, step))))


def _data(call: StageCall) -> str:
    return call.config.data_uri


def _run(call: StageCall) -> str:
    return call.config.run_uri


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    # build-lsun: the paper's name for a center-crop build (LSUN, or any folder of scenes)
    Stage("build-lsun", _build, _build_done, _build_stored, _data, build_kind="center-crop"),
    Stage("build-faces", _build, _build_done, _build_stored, _data, build_kind="faces"),
    Stage("dedup", _dedup, _dedup_done, lambda call: _dedup_result(call, shards.read_manifest(call.options["out"])),
          lambda call: call.options["out"], arguments=lambda call: [call.options["source"], "--out",
                                                                     call.options["out"]]),
    Stage("train", _train, _train_done, _train_stored, _run),
    Stage("evaluate", _evaluate, _evaluate_done, _evaluate_stored, _run, on_ray=False),  # computes in its process
)}
STAGES = tuple(REGISTRY)
BUILD_KINDS = {s.name: s.build_kind for s in REGISTRY.values() if s.build_kind}
STAGE_OF_KIND = {kind: stage for stage, kind in BUILD_KINDS.items()}


# ------------------------------------------------------------------------------------------ the stages, as jobs


def job_config(cfg: Config) -> Config:
    """The config a job runs: no address (inside a job, Ray's RAY_ADDRESS names the cluster: it joins)."""
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"address": None})})


def _travelling_files(call: StageCall, work: Path) -> tuple[StageCall, list[str]]:
    """Local files the stage reads that the cluster cannot see (a box file, a cascade) go with the job."""
    options, cfg, moved = dict(call.options), job_config(call.config), []
    boxes = options.get("boxes")
    if boxes and not storage.is_s3(boxes) and Path(boxes).is_file():
        shutil.copy(boxes, work / "boxes.json")
        options["boxes"], moved = "boxes.json", moved + [boxes]
    if cfg.build is not None and Path(cfg.build.cascade).is_file():
        source = cfg.build.cascade
        shutil.copy(source, work / Path(source).name)
        cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"cascade": Path(source).name})})
        moved.append(source)
    return StageCall(call.stage, cfg, options), moved


def run_as_job(call: StageCall, address: str, emit: Emit = log.info, poll_s: float = 1.0) -> dict[str, Any]:
    """Run a stage on the cluster at `address` as a Ray Job (`dcgan <stage> ... --json`) and return its result.

    The resolved config travels in the job's environment (`--config env:DCGAN_JOB_CONFIG`), not in a Ray
    working_dir: a job's processes run inside its working_dir, and a runtime-env agent may delete and unpack that
    folder again while they run (every node started on one machine shares the head's runtime_resources folder), which
    leaves the driver in a deleted directory (torch's oneMKL aborts at import: "Cannot load libtorch_cpu.so").
    Only a user's local file that the cluster cannot see (a box file, a cascade) still needs a working_dir.
    """
    from dcgan import jobs

    with tempfile.TemporaryDirectory(prefix="dcgan-job-") as tmp:
        work = Path(tmp)
        job_call, moved = _travelling_files(call, work)
        env = {**jobs.JOB_ENV, **jobs.retry_env(), **jobs.aws_env(call.config.cluster.pass_credentials),
               JOB_CONFIG_ENV: dump_config(job_call.config)}
        runtime_env: dict[str, Any] = {"env_vars": env}
        if moved:
            runtime_env["working_dir"] = str(work)
        where = {}
        if call.stage == "evaluate":  # the evaluation computes in its driver: place it on a worker node
            where = {"entrypoint_num_cpus": 1, "entrypoint_num_gpus": 1 if call.config.cluster.use_gpu else 0}
        slug = re.sub(r"[^a-z0-9-]+", "-", call.config.name.lower()).strip("-") or "run"
        if moved:
            emit(f"sending with the job: {', '.join(moved)}")
        def relayed(line: str) -> None:  # the job's progress lines reach this process's listeners too
            progress.relay(line)
            emit(line)

        logs = jobs.run_job(address, " ".join(_quote(a) for a in job_call.command(ENV_PREFIX + JOB_CONFIG_ENV)),
                            runtime_env, relayed,
                            submission_id=f"dcgan-{call.stage}-{slug}-{uuid.uuid4().hex[:8]}",
                            metadata={"dcgan.stage": call.stage, "dcgan.run": call.config.run_uri},
                            poll_s=poll_s, last_line=is_last_line, **where)
    return parse_result(logs) or stored_result(call)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def result_line(result: dict[str, Any]) -> str:
    """The one line of JSON a stage prints with --json (and a job's caller reads back)."""
    return json.dumps({RESULT_KEY: result}, default=str, separators=(",", ":"))


def is_last_line(line: str) -> bool:
    """A command's result line or its fault's (`errors.Fault.job_line`): the last it prints before it exits."""
    line = line.strip()
    return line.startswith('{"' + RESULT_KEY + '"') or line.startswith('{"' + FAULT_KEY + '"')


def parse_result(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith('{"' + RESULT_KEY + '"'):
            return json.loads(line)[RESULT_KEY]
    return None


def stored_result(call: StageCall) -> dict[str, Any]:
    """A finished stage's result as its outputs in storage say it (when a job's log did not reach the caller)."""
    return {"stage": call.stage, "skipped": False, **REGISTRY[call.stage].stored(call)}
