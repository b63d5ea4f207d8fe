"""The digit sample-quality figure (dcgan.evaluation.digits): a classifier the project trains on held-out MNIST digits,
its Frechet distance and confident share on real, junk and generated digits, and the `digits` evaluation suite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dcgan.config import EvalConfig, ModelConfig
from dcgan.evaluation import digits
from dcgan.evaluation.driver import evaluate
from dcgan.networks import Discriminator, Generator
from test_evaluate import save_run, write_dataset
from test_latent import SMALL


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs on a shared 2-core box: more threads only contend
    yield
    torch.set_num_threads(threads)


def test_split_keeps_the_held_out_digits_out_of_the_demo():
    pool = digits.demo_indices()
    _, held_labels = digits.held_out()
    assert len(pool) == 4000 and len(set(pool)) == 4000
    assert np.bincount(held_labels).tolist() == [100] * 10
    _, y = digits.mnist_rgb32(pool[:50])
    assert np.bincount(y).tolist() == [5] * 10  # a prefix holds every class alike
    x, y = digits.mnist_rgb32(pool)
    hx, _ = digits.held_out()
    seen = {img.tobytes() for img in x}
    assert not any(img.tobytes() in seen for img in hx)


@pytest.mark.slow  # trains the classifier on one thread: 15-30 s
def test_classifier_is_accurate_on_digits_it_never_saw():
    net = digits.held_out_classifier()
    x, y = digits.mnist_rgb32(digits.demo_indices())
    _, p = digits.classify(net, x)
    assert (p.argmax(1) == y).mean() > 0.95


def test_training_is_deterministic_for_a_seed():
    x, y = digits.held_out()
    a = digits.train_classifier(x[::5], y[::5], seed=3, epochs=1)
    b = digits.train_classifier(x[::5], y[::5], seed=3, epochs=1)
    c = digits.train_classifier(x[::5], y[::5], seed=4, epochs=1)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.state_dict()["out.1.weight"], c.state_dict()["out.1.weight"])


@pytest.mark.slow  # trains the classifier on one thread: 15-30 s
def test_real_digits_score_well_and_junk_badly():
    x, _ = digits.mnist_rgb32(digits.demo_indices(1000))
    real = digits.digit_quality(x)
    assert real["digit_fd"] < 20 and real["confident_share"] > 0.85 and real["classes_covered"] == 10
    rng = np.random.default_rng(0)
    noise = digits.digit_quality(rng.integers(0, 256, x.shape, dtype=np.uint8))
    blank = digits.digit_quality(np.zeros_like(x))
    # two digits overlaid with an offset: digit strokes, but no digit
    mixed = digits.digit_quality(np.maximum(x, np.roll(x[::-1], (3, 3), (1, 2))))
    for junk in (noise, blank):
        assert junk["digit_fd"] > 30 * real["digit_fd"] and junk["confident_share"] < 0.05
    assert mixed["digit_fd"] > 10 * real["digit_fd"] and mixed["confident_share"] < 0.75 * real["confident_share"]
    grey = digits.digit_quality(x[..., :1])  # one channel reads as three
    assert grey["digit_fd"] == pytest.approx(real["digit_fd"], rel=1e-6)
    with pytest.raises(ValueError, match="32x32"):
        digits.digit_quality(np.zeros((4, 64, 64, 3), np.uint8))


def _run(tmp_path, g, d, name: str) -> tuple[str, dict]:
    run, data = str(tmp_path / name), str(tmp_path / "data")
    if not (tmp_path / "data").exists():
        x, _ = digits.mnist_rgb32(digits.demo_indices(1000))
        write_dataset(data, x[..., :1])
    save_run(run, g, d, SMALL, data)
    m = evaluate(run, EvalConfig(suites=["samples", "digits"], n_samples=16), device="cpu")
    return run, m


@pytest.mark.slow  # ~18 s of CPU
def test_suite_writes_its_numbers_into_metrics_jsonl(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    run, m = _run(tmp_path, Generator(cfg), Discriminator(cfg), "untrained")
    s = m["suites"]["digits"]
    assert s["status"] == "ok" and s["n_samples"] == 1000 and s["n_reference"] == 1000
    assert s["real_fd"] < 20 < s["digit_fd"]  # the data's floor, and a generator that draws no digits
    line = json.loads((tmp_path / "untrained" / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["suites"]["digits"]["digit_fd"] == pytest.approx(s["digit_fd"])
    assert set(line["suites"]["digits"]["confident_classes"]) == {str(k) for k in range(10)}
    report = (tmp_path / "untrained" / "eval" / "step-0000100" / "report.md").read_text()
    assert "## Sample quality: digit classifier" in report and "| digit_fd |" in report
    assert "digits.digit_fd" in (tmp_path / "untrained" / "eval" / "report.md").read_text()


def test_suite_does_not_run_on_other_resolutions(tmp_path):
    model = dict(SMALL, resolution=64)
    cfg = ModelConfig(**model)
    run = str(tmp_path / "run64")
    save_run(run, Generator(cfg), Discriminator(cfg), model)
    m = evaluate(run, EvalConfig(suites=["digits"]), device="cpu")
    assert m["suites"]["digits"]["status"].startswith("not run: the digit classifier takes 32x32")
