"""`evaluate` end to end: a run's checkpoint in, report.md/html + metrics.json + pictures out; not-run suites named."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from dcgan import checkpoints
from dcgan.commands import evaluate as evaluate_cmd
from dcgan.config import EvalConfig, ModelConfig, parse_config
from dcgan.evaluation.driver import evaluate, evaluate_every_checkpoint
from dcgan.networks import Discriminator, Generator
from preprocessing import shards, storage
from fresh_process import run_fresh
from realdata import mnist_rgb32
from test_latent import SMALL, trained_small_gan
from test_svm import write_cifar, write_svhn
from preprocessing import dataset_layout


def save_run(run_uri: str, g, d, model: dict, data: str | None = None) -> None:
    cfg = parse_config({"name": "eval-test", "model": model, "run": run_uri, "data": data})
    checkpoints.save(run_uri, 100, {"generator": g.state_dict(), "discriminator": d.state_dict(), "step": 100,
                                    "config": cfg.model_dump(mode="json")})


def write_dataset(uri: str, images: np.ndarray) -> None:
    table = shards.make_table([f"mnist-{i}" for i in range(len(images))], images)
    entry = shards.write_table(uri, dataset_layout.part(0), table)
    shards.write_manifest(uri, kind="mnist", resolution=32, channels=images.shape[-1], shards=[entry])


@pytest.mark.slow
def test_evaluate_trained_run_writes_the_report(tmp_path):
    g, d = trained_small_gan()
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    write_dataset(data, mnist_rgb32(400)[..., :1])
    save_run(run, g, d, SMALL, data)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"boxes": {str(i): [[8, 8, 24, 24]] for i in range(6)}}))
    cifar, _ = write_cifar(tmp_path / "cifar")
    cfg = EvalConfig(suites=["samples", "walks", "arithmetic", "forgetting", "guided-backprop", "memorisation", "fid",
                             "cifar10", "svhn"], n_samples=16, cifar10=str(cifar))
    m = evaluate(run, cfg, arithmetic="0,1,2 - 3,4,5 + 6,7,8", boxes=str(boxes), device="cpu")
    s = m["suites"]
    for ok in ("samples", "walks", "arithmetic", "forgetting", "guided-backprop", "memorisation"):
        assert s[ok]["status"] == "ok", (ok, s[ok])
    assert s["fid"]["status"].startswith("not run: no Inception weights given") and "pt_inception" in s["fid"]["status"]
    assert s["cifar10"]["status"].startswith("not run: CIFAR-10 images are 32x32 RGB; this run's D takes 32x32x1")
    assert s["svhn"]["status"].startswith("not run: no SVHN files given")
    assert m["data"] == data and s["memorisation"]["n_real"] == 400 and s["forgetting"]["n_dropped"] > 0
    out = tmp_path / "run" / "eval" / "step-0000100"
    for name in ("report.md", "report.html", "metrics.json", "samples.png", "sample_sheet.png", "sample_z.npy",
                 "walk-0.png", "arithmetic_terms.png", "arithmetic_result.png", "forgetting.png",
                 "guided_backprop.png", "memorisation.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "![" in md and "not run: no SVHN files given" in md and "## Forgetting to draw" in md
    assert '<img src="forgetting.png"' in (out / "report.html").read_text()
    assert json.loads((out / "metrics.json").read_text())["suites"]["arithmetic"]["expression"] == "0,1,2 - 3,4,5 + 6,7,8"
    # the run's history: one line per evaluation, an index that links it; the same evaluation is not redone
    history = (tmp_path / "run" / "eval" / "metrics.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["suites"]["memorisation"]["n_real"] == 400
    assert "step-0000100/report.md" in (tmp_path / "run" / "eval" / "report.md").read_text()
    again = evaluate(run, cfg, arithmetic="0,1,2 - 3,4,5 + 6,7,8", boxes=str(boxes), device="cpu")
    assert again["skipped"] is True and len((tmp_path / "run" / "eval" / "metrics.jsonl").read_text().splitlines()) == 1


def test_evaluate_svm_suites_on_s3(tmp_path, s3_bucket):
    """An RGB 32x32 run on S3 with CIFAR-10 and SVHN files (tiny, real digits): both SVM protocols run."""
    torch.manual_seed(0)
    model = dict(resolution=32, channels=3, z_dim=16, ngf=16, ndf=16, kernel_size=4,
                 d_channels=[8, 16, 32], d_strides=[2, 2, 2], d_kernel_size=5)
    m = ModelConfig(**model)
    run = f"{s3_bucket}/runs/rgb"
    save_run(run, Generator(m), Discriminator(m), model)
    cifar, _ = write_cifar(tmp_path / "c", n=40, tar=True)
    storage.upload_file(cifar, f"{s3_bucket}/bench/cifar-10-python.tar.gz")
    svhn = write_svhn(tmp_path / "s", n_train=300, n_test=50)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        storage.upload_file(svhn / name, f"{s3_bucket}/bench/svhn/{name}")
    args = argparse.ArgumentParser()
    sub = args.add_subparsers()
    evaluate_cmd.register(sub)
    ns = args.parse_args(["evaluate", "--run", run, "--suite", "samples,cifar10,svhn", "--samples", "8",
                          "--cifar10", f"{s3_bucket}/bench/cifar-10-python.tar.gz", "--svhn", f"{s3_bucket}/bench/svhn",
                          "--device", "cpu"])
    import dcgan.evaluation.svm as svm_mod

    saved = svm_mod.svhn_protocol.__defaults__
    try:  # 300 training digits hold 30 per class: draw 10, and fewer draws to keep the test short
        svm_mod.svhn_protocol.__defaults__ = (10, (1e-3, 1e-2), 2, 3, True, 0)
        assert ns.func(ns) == 0
    finally:
        svm_mod.svhn_protocol.__defaults__ = saved
    metrics = storage.read_json(f"{run}/eval/step-0000100/metrics.json")
    c, s = metrics["suites"]["cifar10"], metrics["suites"]["svhn"]
    assert c["status"] == "ok" and c["n_train"] == 200 and c["feature_dim"] == 16 * 56 and 0 <= c["test_accuracy"] <= 1
    assert s["status"] == "ok" and s["n_val"] == 60 and s["test_draws"] == 3
    assert storage.exists(f"{run}/eval/step-0000100/report.html") and storage.exists(f"{run}/eval/step-0000100/samples.png")
    assert storage.exists(f"{run}/eval/metrics.jsonl") and storage.exists(f"{run}/eval/report.html")
    # the pictures and numbers also reach the run's TensorBoard (uploaded beside training's event files)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    for uri in storage.list_uris(f"{run}/metrics/tensorboard"):
        storage.download_file(uri, tb / uri.rsplit("/", 1)[-1])
    events = EventAccumulator(str(tb))
    events.Reload()
    assert "eval/samples" in events.Tags()["images"] and "eval/cifar10/test_accuracy" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/cifar10/test_accuracy")] == [100]


def test_bad_inputs_stop_before_any_suite(tmp_path):
    g, d = Generator(ModelConfig(**SMALL)), Discriminator(ModelConfig(**SMALL))
    run = str(tmp_path / "run")
    save_run(run, g, d, SMALL)
    with pytest.raises(ValueError, match="unknown evaluation suites \\['fidd'\\]"):  # when the config is read
        EvalConfig(suites=["fidd"])
    with pytest.raises(FileNotFoundError, match=r"cifar10: .*nowhere does not exist"):
        evaluate(run, EvalConfig(suites=["cifar10"], cifar10=str(tmp_path / "nowhere")), device="cpu")
    with pytest.raises(ValueError, match=r"sample indices \[99\] are not on the sheet"):
        evaluate(run, EvalConfig(suites=["arithmetic"], n_samples=16), arithmetic="1,2 - 99", device="cpu")
    assert not (tmp_path / "run" / "eval").exists()
    # a checkpoint whose weights belong to another architecture
    other = str(tmp_path / "other")
    big = dict(SMALL, ngf=64)
    save_run(other, Generator(ModelConfig(**big)), d, SMALL)
    with pytest.raises(checkpoints.CheckpointError, match="weights do not fit the config's networks"):
        evaluate(other, EvalConfig(suites=["samples"]), device="cpu")


def test_every_checkpoint_evaluates_the_ones_not_yet_evaluated(tmp_path):
    g, d = Generator(ModelConfig(**SMALL)), Discriminator(ModelConfig(**SMALL))
    run = str(tmp_path / "run")
    save_run(run, g, d, SMALL)
    cfg = parse_config({"name": "eval-test", "model": SMALL, "run": run})
    checkpoints.save(run, 200, {"generator": g.state_dict(), "discriminator": d.state_dict(), "step": 200,
                                "config": cfg.model_dump(mode="json")})
    quick = EvalConfig(suites=["samples"], n_samples=4)
    evaluate(run, quick, step=100, device="cpu")
    done = evaluate_every_checkpoint(run, quick, device="cpu")
    assert [m["step"] for m in done] == [200] and evaluate_every_checkpoint(run, quick, device="cpu") == []
    # the same question as evaluate's: evaluated with other suites is not "already evaluated"
    assert [m["step"] for m in evaluate_every_checkpoint(run, EvalConfig(suites=["samples"], n_samples=6),
                                                         device="cpu")] == [100, 200]
    index = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert index.index("step-0000200") < index.index("step-0000100")  # newest first


def test_an_evaluation_starts_no_ray_and_its_done_checks_import_neither_torch_nor_sklearn(tmp_path):
    """The evaluation computes in its own process: `dcgan evaluate` starts or joins no Ray (a local Ray's start was
    ~4 s of a sample sheet's ~9, issue 22's fixed cost), and the done-checks a CLI makes before it submits a job
    (evaluate's and train's) load neither torch nor sklearn (~1 s each); the suites import sklearn where they fit."""
    g, d = Generator(ModelConfig(**SMALL)), Discriminator(ModelConfig(**SMALL))
    run = str(tmp_path / "run")
    save_run(run, g, d, SMALL)
    code = ("import json, sys\n"
            "from dcgan import stages\n"
            "from dcgan.config import parse_config\n"
            f"cfg = parse_config({{'name': 'eval-test', 'run': {run!r}, 'model': {SMALL!r}, 'train': {{'steps': 50}},"
            " 'evaluate': {'suites': ['samples'], 'n_samples': 4}})\n"
            "call = stages.StageCall('evaluate', cfg, {'device': 'cpu'})\n"
            "checks = [stages.REGISTRY['evaluate'].done(call), stages.REGISTRY['train'].done("
            "stages.StageCall('train', cfg))]\n"
            "light = ['torch' in sys.modules, 'sklearn' in sys.modules]\n"
            "said = [stages.where(call), stages.where(stages.StageCall('train', cfg))]\n"
            "result = stages.run(call, emit=lambda line: None)\n"
            "import ray\n"
            "print(json.dumps([light, [c is None for c in checks], checks[1][0], ray.is_initialized(), "
            "result['metrics']['suites']['samples']['status'], stages.REGISTRY['evaluate'].done(call) is None, "
            "said]))\n")
    light, not_done, train_why, ray_started, status, redo, said = run_fresh(code)
    assert light == [False, False]
    assert said == ["in this process (it sends no Ray task)", "on a local Ray in this process"]  # a flow's log says
    assert not_done == [True, False] and "already has a checkpoint at step 100" in train_why  # the checks ran
    assert (ray_started, status, redo) == (False, "ok", False)
    assert (tmp_path / "run" / "eval" / "step-0000100" / "samples.png").is_file()
