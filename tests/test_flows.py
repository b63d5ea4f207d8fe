"""The Prefect flows under Prefect's test harness: parameter validation, retries, skipping complete stages,
artifacts, and the whole pipeline (build -> train -> evaluate) on real digits."""

from __future__ import annotations

import pytest
from prefect import flow, task
from prefect_fixtures import prefect_harness, run_logs  # noqa: F401  (fixture)

from dcgan.config import load_config
from pipelines.demo import export_mnist
from pipelines.flows import build_faces, build_lsun, dcgan_pipeline, train_dcgan
from pipelines.tasks import retry_transient
from preprocessing.config import BuildConfig, DedupConfig
from preprocessing.shards import read_manifest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def read_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def test_bad_parameters_fail_validation_naming_the_field(tmp_path):
    state = build_faces(build={"input": str(tmp_path), "resolution": 48}, out=str(tmp_path / "out"),
                        return_state=True)
    assert state.is_failed()
    assert "build.resolution" in state.message and "power of two" in state.message
    state = train_dcgan(config={"train": {"steps": 0}}, return_state=True)
    assert state.is_failed() and "config.train.steps" in state.message
    state = dcgan_pipeline(config={"modle": {}}, return_state=True)
    assert state.is_failed() and "config.modle" in state.message
    assert not (tmp_path / "out").exists()


def test_bad_input_is_not_retried_but_transient_faults_are():
    attempts = {"bad": 0, "flaky": 0}

    @task(retries=2, retry_delay_seconds=[0, 0], retry_condition_fn=retry_transient)
    def step(kind: str) -> str:
        attempts[kind] += 1
        if kind == "bad":
            raise ValueError("train.steps: must be positive")
        if attempts[kind] < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    @flow
    def both() -> str:
        bad = step("bad", return_state=True)
        assert bad.is_failed()
        return step("flaky")

    assert both() == "ok"
    assert attempts == {"bad": 1, "flaky": 3}


def test_build_lsun_builds_then_skips_and_publishes_counts(ray_cluster, tmp_path):
    digits = export_mnist(tmp_path / "digits", 150)
    build = BuildConfig(input=str(digits), resolution=32, shard_rows=64)
    out = str(tmp_path / "datasets" / "digits" / "v1")

    first = build_lsun(build=build, out=out, dedup=DedupConfig(enabled=False), return_state=True)
    result = first.result()
    manifest = read_manifest(out)
    assert result["skipped"] is False and result["kind"] == "center-crop" and result["dataset"] == out
    assert read_manifest(out)["counts"]["rows"] == 150
    table = read_artifact("dataset-digits-v1")
    assert table is not None and '"rows"' in table.data and "150" in table.data

    second = build_lsun(build=build, out=out, dedup=DedupConfig(enabled=False), return_state=True)
    assert second.result()["skipped"] is True
    assert "skipping build-lsun" in run_logs(second.state_details.flow_run_id)
    assert read_manifest(out)["created_at"] == manifest["created_at"]


@pytest.mark.slow
def test_pipeline_builds_trains_evaluates_and_a_rerun_skips(ray_cluster, tmp_path):
    digits = export_mnist(tmp_path / "digits", 200)
    cfg = load_config("configs/tiny-test.yaml", {
        "root": str(tmp_path), "name": "digits",
        "build": {"kind": "lsun", "input": str(digits), "resolution": 32, "shard_rows": 128},
        "dedup.enabled": False,
        "train.steps": 4, "train.checkpoint_every": 2,
        "evaluate.suites": ["samples"], "evaluate.n_samples": 16,
    })
    result = dcgan_pipeline(cfg)
    assert result["dataset"]["counts"]["rows"] == 200
    assert result["train"]["step"] == 4 and result["train"]["skipped"] is False
    assert (tmp_path / "runs" / "digits" / "samples" / "step-0000004.png").is_file()
    assert (tmp_path / "runs" / "digits" / "eval" / "report.md").is_file()
    samples = read_artifact("samples-runs-digits")
    assert samples is not None and "data:image/png;base64," in samples.data
    assert read_artifact("training-runs-digits") is not None
    assert read_artifact("evaluation-runs-digits") is not None
    # progress artifacts, one per step, at 100% once the stage is done
    for key in ("progress-center-crop-digits-v1", "progress-train-runs-digits", "progress-evaluate-runs-digits"):
        shown = read_artifact(key)
        assert shown is not None and shown.type == "progress" and float(shown.data) == 100.0, key
    # TensorBoard has the fixed-z sample grid of every checkpoint, beside the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "digits" / "metrics" / "tensorboard"))
    events.Reload()
    assert "samples/fixed_z" in events.Tags()["images"] and "train/loss_d" in events.Tags()["scalars"]
    assert [e.step for e in events.Images("samples/fixed_z")] == [2, 4]

    again = train_dcgan(cfg, return_state=True)
    assert again.result()["skipped"] is True and again.result()["step"] == 4
    assert "skipping train: " in run_logs(again.state_details.flow_run_id)
