"""The evaluation suites of the paper (sections 5-6), each a function that fills one section of the report
(layer: dcgan). A suite that needs something the user did not give (CIFAR-10/SVHN files, Inception weights, the
dataset, drawn boxes) raises `NotRun` and appears in the report as "not run: <why>"; `preflight` checks the files that
are given before any slow suite starts."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dcgan import run_layout
from dcgan.config import EvalConfig
from dcgan.evaluation import datasets, digits, features, fid, forgetting, guided_backprop, latent, memorisation, svm
from dcgan.evaluation.inception import how_to_get_weights, load_inception
from dcgan.sampling import save_grid, save_png, to_uint8
from preprocessing import storage
from preprocessing.errors import InputError, MissingError
from preprocessing.shards import ShardDataset

DEMO_ARITHMETIC = "0,1,2 - 3,4,5 + 6,7,8"


class NotRun(Exception):
    """A suite that cannot run with what was given; the message says why and what to give."""


@dataclass
class Section:
    title: str
    status: str = "ok"
    text: list[str] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name in eval/, caption)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    run_uri: str
    out: str
    g: torch.nn.Module
    d: torch.nn.Module
    step: int
    cfg: EvalConfig
    data_uri: str | None
    arithmetic: str | None
    boxes: str | None
    device: torch.device
    fid_samples: int
    _real: np.ndarray | None = None

    def save(self, name: str, images, nrow: int = 8) -> str:
        save_grid(images, storage.join(self.out, name), nrow=nrow)
        return name

    def real_images(self, n: int) -> np.ndarray:
        """Up to n dataset images, spread evenly over the dataset (read once, cached)."""
        if not self.data_uri:
            raise NotRun("no dataset given (--data URI)")
        if self._real is None or len(self._real) < n:
            ds = ShardDataset(self.data_uri, check="on_read", checksums=False)  # one read of what is sampled
            if ds.resolution != self.g.cfg.resolution:
                raise InputError(f"{self.data_uri}: dataset resolution {ds.resolution}, the run's "
                                 f"model is {self.g.cfg.resolution}")
            idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(np.int64))
            self._real = ds.images(idx) if len(ds) else np.zeros((0,), np.uint8)
        if len(self._real) == 0:
            raise NotRun(f"{self.data_uri}: the dataset has no images")
        return self._real[:n]

    def samples(self, n: int, seed: int = 7) -> np.ndarray:
        z = latent.sample_z(self.g.cfg, n, generator=torch.Generator().manual_seed(seed))
        return to_uint8(latent.render(self.g, z))


# ----------------------------------------------------------------------------------------------------------- suites


def suite_samples(c: Context, s: Section) -> None:
    z = latent.sheet_z(c.g, c.cfg.n_samples)
    imgs = latent.render(c.g, z)
    s.images.append((c.save("samples.png", imgs), f"{len(z)} samples (step {c.step})"))
    save_png(latent.numbered_sheet(imgs), run_layout.eval_file(c.out, "sample_sheet.png"))
    buf = io.BytesIO()
    np.save(buf, z.numpy())
    storage.write_bytes(run_layout.eval_file(c.out, "sample_z.npy"), buf.getvalue())
    s.images.append(("sample_sheet.png", "numbered sheet: pick concepts for --arithmetic and draw --boxes on it"))
    s.metrics = {"n": len(z), "z_file": "sample_z.npy", "seed": latent.SHEET_SEED}


def suite_walks(c: Context, s: Section) -> None:
    for i in range(2):
        imgs, nrow = latent.latent_walk(c.g, points=9, steps=8, seed=100 + i)
        s.images.append((c.save(f"walk-{i}.png", imgs, nrow=nrow), f"walk {i}: 9 random points, one leg a row"))
    s.text.append("Smooth transitions along each row, without sharp jumps, suggest the model has not memorised.")


def suite_arithmetic(c: Context, s: Section) -> None:
    expr = c.arithmetic or DEMO_ARITHMETIC
    terms = latent.parse_arithmetic(expr, c.cfg.n_samples)
    z = latent.sheet_z(c.g, c.cfg.n_samples)
    out = latent.vector_arithmetic(c.g, z, terms)
    s.images.append((c.save("arithmetic_terms.png", out["terms"], nrow=out["terms_nrow"]),
                     "each row: a concept's exemplars from the sample sheet, then the image of their mean z"))
    s.images.append((c.save("arithmetic_result.png", out["result"], nrow=3),
                     f"{expr}: the result in the centre, +-0.25 uniform noise around it"))
    if not c.arithmetic:
        s.text.append(f"Demonstration on arbitrary samples ({DEMO_ARITHMETIC}); pick concepts on sample_sheet.png "
                      "and pass --arithmetic \"a,b,c - d,e,f + g,h,i\".")
    s.metrics = {"expression": expr}


def suite_forgetting(c: Context, s: Section) -> None:
    if not c.boxes:
        raise NotRun("no boxes given (--boxes JSON of object boxes drawn on sample_sheet.png)")
    boxes = forgetting.load_boxes(c.boxes, c.cfg.n_samples, c.g.cfg.resolution)
    z = latent.sheet_z(c.g, c.cfg.n_samples)
    fit = forgetting.fit_object_maps(c.g, z, boxes)
    fresh = latent.sample_z(c.g.cfg, 8, generator=torch.Generator().manual_seed(11))
    s.images.append((c.save("forgetting.png", forgetting.forgetting_pairs(c.g, fresh, fit["maps"]), nrow=8),
                     "top: samples; bottom: the same z with the object's feature maps dropped"))
    s.metrics = {k: v for k, v in fit.items() if k != "weights"} | {"n_dropped": len(fit["maps"])}
    s.metrics.pop("maps")


def suite_guided(c: Context, s: Section) -> None:
    try:
        images, source = c.real_images(512), "dataset images"
    except NotRun:
        images, source = c.samples(512), "samples (no dataset given)"
    d = c.d.eval()
    channels = guided_backprop.top_channels(d, images)
    tiles, nrow = guided_backprop.guided_maps(d, images, channels)
    s.images.append((c.save("guided_backprop.png", tiles, nrow=nrow),
                     "per channel of D's last conv layer: its most activating images, beneath them the guided maps"))
    s.metrics = {"channels": channels, "images": source}


def suite_memorisation(c: Context, s: Section) -> None:
    real = c.real_images(10_000)
    out = memorisation.memorisation(c.samples(max(c.cfg.n_samples, 256)), real, c.d.eval())
    s.images.append((c.save("memorisation.png", out.pop("grid"), nrow=out.pop("grid_nrow")),
                     "rows: samples; their nearest training image in pixels; in D features"))
    s.metrics = out


def suite_digits(c: Context, s: Section) -> None:
    if (c.g.cfg.resolution, c.g.cfg.channels) not in ((32, 1), (32, 3)):
        raise NotRun(f"the digit classifier takes 32x32 MNIST-like digits; this run's G draws "
                     f"{c.g.cfg.resolution}x{c.g.cfg.resolution}x{c.g.cfg.channels}")
    try:
        real = c.real_images(len(digits.demo_indices()))
    except NotRun:
        real = None
    s.metrics = digits.digit_quality(c.samples(1000), real)
    s.text.append("A small CNN trained by the project on 1,000 held-out MNIST digits (dcgan.evaluation.digits): "
                  "digit_fd is the Frechet distance to those digits in its 128-d features (lower is better; real_fd "
                  "is the training digits' own, the floor), confident_share the share of samples it classifies with "
                  f"probability >= {digits.CONFIDENT}, confident_classes their classes. Meant for MNIST-like data.")


def suite_fid(c: Context, s: Section) -> None:
    if not c.cfg.inception_weights:
        raise NotRun(f"no Inception weights given: {how_to_get_weights()}")
    real = c.real_images(c.fid_samples)
    net = load_inception(c.cfg.inception_weights, c.device)
    fn = lambda x: fid.network_features(net, x, device=c.device)  # noqa: E731
    s.metrics = fid.sample_quality(c.samples(len(real)), real, fn)
    s.text.append("FID as pytorch-fid's calculate_frechet_distance, KID as torch-fidelity (polynomial kernel, unbiased "
                  "MMD over subsets), both on pytorch-fid's FID Inception pool features. Fewer than 50,000 samples "
                  "bias FID upwards: compare numbers only at equal sample counts.")


def _svm_discriminator(c: Context, name: str) -> torch.nn.Module:
    m = c.d.cfg
    if (m.resolution, m.channels) != (32, 3):
        raise NotRun(f"{name} images are 32x32 RGB; this run's D takes {m.resolution}x{m.resolution}x{m.channels} "
                     "(the paper used its 32x32 ImageNet model, configs/imagenet-32.yaml)")
    return copy.deepcopy(c.d)  # BN statistics get re-estimated: leave the run's D as it is


def suite_cifar10(c: Context, s: Section) -> None:
    if not c.cfg.cifar10:
        raise NotRun("no CIFAR-10 files given (--cifar10 PATH to cifar-10-python.tar.gz or its directory)")
    d = _svm_discriminator(c, "CIFAR-10")
    train, test = datasets.load_cifar10(c.cfg.cifar10)
    ftr, fte = features.discriminator_features(d, train.images, test.images, device=c.device,
                                               names=(train.source, test.source))
    s.metrics = svm.cifar10_protocol(ftr, train.labels, fte, test.labels)
    s.text.append(f"L2-SVM on {ftr.shape[1]}-d D features: test accuracy {s.metrics['test_accuracy']:.2%} "
                  f"(paper: 82.8%).")


def suite_svhn(c: Context, s: Section) -> None:
    if not c.cfg.svhn:
        raise NotRun("no SVHN files given (--svhn PATH to a directory with train_32x32.mat and test_32x32.mat)")
    d = _svm_discriminator(c, "SVHN")
    full, test = datasets.load_svhn(c.cfg.svhn)
    train, val = datasets.split_validation(full, min(10_000, len(full) // 5))
    ftr, fva, fte = features.discriminator_features(d, train.images, val.images, test.images, device=c.device,
                                                    names=(train.source, val.source, test.source))
    s.metrics = svm.svhn_protocol(ftr, train.labels, fva, val.labels, fte, test.labels)
    m = s.metrics
    s.text.append(f"1000 labels: test error {m['test_error_mean']:.2%} +- {m['test_error_95']:.2%} "
                  f"over {m['test_draws']} draws (paper: 22.48%).")


RUNNERS: dict[str, tuple[str, Callable[[Context, Section], None]]] = {
    "samples": ("Samples", suite_samples),
    "walks": ("Walks in the latent space", suite_walks),
    "arithmetic": ("Vector arithmetic", suite_arithmetic),
    "forgetting": ("Forgetting to draw", suite_forgetting),
    "guided-backprop": ("Guided backpropagation of D's features", suite_guided),
    "memorisation": ("Memorisation check", suite_memorisation),
    "digits": ("Sample quality: digit classifier", suite_digits),
    "fid": ("Sample quality: FID and KID", suite_fid),
    "cifar10": ("CIFAR-10: L2-SVM on D features", suite_cifar10),
    "svhn": ("SVHN with 1000 labels: L2-SVM on D features", suite_svhn),
}


# ------------------------------------------------------------------------------------------------------- checks


def preflight(cfg: EvalConfig, suites: list[str], arithmetic: str | None, boxes: str | None) -> None:
    """Fail before any slow work when a given file is missing or an expression does not parse."""
    if "arithmetic" in suites and arithmetic:
        latent.parse_arithmetic(arithmetic, cfg.n_samples)
    given = {"cifar10": cfg.cifar10, "svhn": cfg.svhn, "fid": cfg.inception_weights, "forgetting": boxes}
    for suite, uri in given.items():
        if suite in suites and uri:
            ok = storage.exists(uri) or (storage.is_s3(uri) and bool(storage.list_uris(uri)))
            if not ok:
                raise MissingError(f"{suite}: {uri} does not exist")
