"""The five flows the deployments run (prefect.yaml; layer: pipelines): build-faces, build-lsun, train-dcgan,
evaluate-dcgan, and dcgan-pipeline (build, then train, then evaluate).

Parameters are the project's typed configs, so Prefect validates a run's parameters against the same pydantic models
the CLI uses and rejects a bad one before any work starts, naming the field. The flows only sequence the shared tasks
of `pipelines.tasks`; all behaviour lives there or below.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dcgan.config import Config, ModelConfig
from dcgan.stages import STAGE_OF_KIND
from pipelines.tasks import build_stage, evaluate_stage, train_stage
from preprocessing.config import BuildConfig, DedupConfig


def _build_config(build: BuildConfig, out: str, dedup: DedupConfig) -> Config:
    return Config(data=out, build=build, dedup=dedup, model=ModelConfig(resolution=build.resolution))


@flow(name="build-faces", flow_run_name="build-faces-{build.resolution}px")
def build_faces(build: BuildConfig, out: str, dedup: DedupConfig = DedupConfig()) -> dict[str, Any]:
    """Detect, crop and shard faces from photos (a folder, an s3:// prefix or a URL list) into the dataset `out`."""
    return build_stage(_build_config(build, out, dedup), "build-faces")


@flow(name="build-lsun", flow_run_name="build-lsun-{build.resolution}px")
def build_lsun(build: BuildConfig, out: str, dedup: DedupConfig = DedupConfig()) -> dict[str, Any]:
    """Decode, center-crop and shard an LSUN LMDB (or a folder of images) into the dataset `out`."""
    return build_stage(_build_config(build, out, dedup), "build-lsun")


@flow(name="train-dcgan", flow_run_name="train-{config.name}")
def train_dcgan(config: Config) -> dict[str, Any]:
    """Train (or resume) `config.run_uri` on `config.data_uri`: a Ray Job when RAY_ADDRESS or cluster.address names
    a cluster's Jobs API, else in this process on a local Ray."""
    return train_stage(config)


@flow(name="evaluate-dcgan", flow_run_name="evaluate-{config.name}")
def evaluate_dcgan(config: Config) -> dict[str, Any]:
    """Evaluate the newest checkpoint of `config.run_uri` with the suites of `config.evaluate`."""
    return evaluate_stage(config)


@flow(name="dcgan-pipeline", flow_run_name="pipeline-{config.name}")
def dcgan_pipeline(config: Config) -> dict[str, Any]:
    """Build the dataset (when `config.build` is given), train, evaluate; stages already complete are skipped."""
    dataset = build_stage(config, STAGE_OF_KIND[config.build.kind]) if config.build is not None else None
    run = train_stage(config)
    evaluation = evaluate_stage(config)
    return {"dataset": dataset, "train": run, "evaluate": evaluation}
