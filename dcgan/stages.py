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

from dcgan.config import ENV_PREFIX, Config, dump_config
from preprocessing import compute, dataset_layout, progress, storage
from preprocessing.errors import InputError

log = logging.getLogger(__name__)

STAGES = ("build-lsun", "build-faces", "dedup", "train", "evaluate")
BUILD_KINDS = {"build-lsun": "center-crop", "build-faces": "faces"}  # build-lsun: the paper's name for center-crop
STAGE_OF_KIND = {kind: stage for stage, kind in BUILD_KINDS.items()}
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
        if self.stage not in STAGES:
            raise InputError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")

    def command(self, config_file: str = "config.yaml") -> list[str]:
        """The `dcgan` command line that runs this call from `config_file` (what a Ray Job runs)."""
        argv = ["dcgan", self.stage]
        if self.stage == "dedup":
            argv += [self.options["source"], "--out", self.options["out"]]
        argv += ["--config", config_file, "--json"]
        for name, value in self.options.items():
            if name not in FLAG_OPTIONS or value in (None, False):
                continue
            flag = "--" + name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        return argv


Emit = Callable[[str], None]


def run(call: StageCall, emit: Emit = log.info) -> dict[str, Any]:
    """Run a stage where the configuration says (see preprocessing.compute); returns its result dict."""
    if call.stage == "train" and call.config.cluster.submit == "rayjob":  # a cluster of its own (dcgan.rayjob)
        from dcgan import rayjob

        return rayjob.run(call, emit)
    where = compute.placement(call.config.cluster.address)
    if where.kind == "jobs":
        return run_as_job(call, where.address, emit)
    return run_here(call, emit)


def run_here(call: StageCall, emit: Emit = log.info) -> dict[str, Any]:
    """Run a stage in this process, on a local Ray or the cluster this process is on."""
    worker_env = None
    if call.config.build is not None and call.stage.startswith("build-"):
        # OpenCV's own pixel cap, a second guard behind the header checks; read once when a worker loads cv2
        worker_env = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(call.config.build.max_pixels)}
    compute.connect(call.config.cluster.address, worker_env=worker_env)
    result = _IMPLEMENTATIONS[call.stage](call, emit)
    return {"stage": call.stage, **result}


# ------------------------------------------------------------------------------------------- the stages, here


def _build(call: StageCall, emit: Emit) -> dict[str, Any]:
    from preprocessing.build import already_built, build_dataset

    cfg, kind = call.config, BUILD_KINDS[call.stage]
    if cfg.build is None or not cfg.build.input:
        raise InputError(f"{call.stage}: no input given (build.input: an LMDB, folder, s3:// prefix or URL list)")
    build = cfg.build.model_copy(update={"kind": kind})
    dedup = cfg.dedup if cfg.dedup.enabled else None
    manifest = None if build.overwrite else already_built(cfg.data_uri, build, dedup)
    if manifest is not None:
        emit(f"skipping {call.stage}: {cfg.data_uri} is already complete with the same parameters "
             f"({manifest['counts']['rows']} rows)")
        return dataset_result(cfg.data_uri, manifest, skipped=True)
    manifest = build_dataset(build, cfg.data_uri, dedup=dedup, progress=call.options.get("progress", True))
    return dataset_result(cfg.data_uri, manifest)


def dataset_result(uri: str, manifest: dict[str, Any], skipped: bool = False) -> dict[str, Any]:
    """What a build or dedup reports: where the dataset is and its figures (the manifest holds the rest)."""
    return {"dataset": uri, "skipped": skipped, "kind": manifest["kind"], "resolution": manifest["resolution"],
            "counts": manifest["counts"], "content_hash": manifest.get("content_hash"),
            "rejects": (manifest.get("rejects") or {}).get("by_reason", {}), "shards": len(manifest["shards"])}


def _dedup(call: StageCall, emit: Emit) -> dict[str, Any]:
    from preprocessing.dedup import dedup_dataset

    o = call.options
    manifest = dedup_dataset(o["source"], o["out"], call.config.dedup, overwrite=bool(o.get("overwrite")))
    info = manifest["dedup"]
    return {**dataset_result(o["out"], manifest), "source": o["source"],
            "report": storage.join(o["out"], info["report"]), "picture": storage.join(o["out"], info["picture"])}


def _train(call: StageCall, emit: Emit) -> dict[str, Any]:
    from dcgan.train import train

    return train(call.config)


def _evaluate(call: StageCall, emit: Emit) -> dict[str, Any]:
    from dcgan import run_layout
    from dcgan.evaluation.driver import evaluate, evaluate_every_checkpoint

    cfg, o = call.config, call.options
    data = cfg.data_uri if dataset_layout.is_complete(cfg.data_uri) else None
    kwargs = dict(data_uri=data, arithmetic=o.get("arithmetic"), boxes=o.get("boxes"), device=o.get("device"),
                  force=bool(o.get("force")))
    if o.get("every_checkpoint"):
        done = evaluate_every_checkpoint(cfg.run_uri, cfg.evaluate, **kwargs)
        emit(f"evaluated {len(done)} checkpoint(s) of {cfg.run_uri} that had no evaluation")
        if not done:
            return {"run": cfg.run_uri, "report": run_layout.eval_index(cfg.run_uri), "evaluated": [],
                    "metrics": None}
        metrics = done[-1]
    else:
        metrics = evaluate(cfg.run_uri, cfg.evaluate, step=o.get("step"), **kwargs)
    if metrics.get("skipped"):
        emit(f"skipping evaluate: step {metrics['step']} of {cfg.run_uri} is already evaluated with these suites "
             "(--force to redo it)")
    out = run_layout.eval_step(cfg.run_uri, metrics["step"])
    return {"run": cfg.run_uri, "step": metrics["step"], "skipped": metrics.get("skipped", False),
            "report": storage.join(out, "report.md"), "html": storage.join(out, "report.html"),
            "index": run_layout.eval_index(cfg.run_uri), "metrics": metrics}


_IMPLEMENTATIONS = {"build-lsun": _build, "build-faces": _build, "dedup": _dedup, "train": _train,
                    "evaluate": _evaluate}


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
        env = {**jobs.JOB_ENV, **jobs.aws_env(call.config.cluster.pass_credentials),
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
                            poll_s=poll_s, **where)
    return parse_result(logs) or stored_result(call)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def result_line(result: dict[str, Any]) -> str:
    """The one line of JSON a stage prints with --json (and a job's caller reads back)."""
    return json.dumps({RESULT_KEY: result}, default=str, separators=(",", ":"))


def parse_result(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith('{"' + RESULT_KEY + '"'):
            return json.loads(line)[RESULT_KEY]
    return None


def stored_result(call: StageCall) -> dict[str, Any]:
    """A finished stage's result as its outputs in storage say it (when a job's log did not reach the caller)."""
    from preprocessing.shards import read_manifest

    cfg, o = call.config, call.options
    if call.stage.startswith("build-"):
        return {"stage": call.stage, **dataset_result(cfg.data_uri, read_manifest(cfg.data_uri))}
    if call.stage == "dedup":
        manifest = read_manifest(o["out"])
        return {"stage": "dedup", **dataset_result(o["out"], manifest), "source": o["source"],
                "report": storage.join(o["out"], manifest["dedup"]["report"]),
                "picture": storage.join(o["out"], manifest["dedup"]["picture"])}
    from dcgan import checkpoints, run_layout

    step = checkpoints.latest_step(cfg.run_uri)
    if call.stage == "train":
        from dcgan.run_log import read_metrics
        from dcgan.train import run_summary

        rows = read_metrics(cfg.run_uri)
        return {"stage": "train", **run_summary(cfg, step, rows[-1] if rows else None)}
    step = o.get("step") or step
    out = run_layout.eval_step(cfg.run_uri, step)
    return {"stage": "evaluate", "run": cfg.run_uri, "step": step, "skipped": False,
            "report": storage.join(out, "report.md"), "html": storage.join(out, "report.html"),
            "index": run_layout.eval_index(cfg.run_uri), "metrics": storage.read_json(storage.join(out, "metrics.json"))}
