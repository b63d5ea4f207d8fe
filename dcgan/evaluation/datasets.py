"""The labelled benchmarks of the paper's section 5, read from their standard distribution files; nothing downloaded.

- CIFAR-10, python version: `data_batch_1`..`data_batch_5` and `test_batch` (pickled dicts with b"data" (N, 3072)
  uint8 in R/G/B planes and b"labels"), in a directory (or its `cifar-10-batches-py/`) or in `cifar-10-python.tar.gz`.
  The pickles are read with an unpickler that accepts numpy arrays and nothing else: no code runs from the file.
- SVHN, format 2: `train_32x32.mat` and `test_32x32.mat` (X (32, 32, 3, N) uint8, y (N, 1) in 1..10 where 10 is the
  digit 0), read with scipy.io.loadmat; label 10 becomes 0 so labels equal digits.

Every location may be a local path or an s3:// URI (copied to a temporary directory first). Files that do not match
the format raise a ValueError naming the file and the mismatch.

Layer: dcgan.
"""

from __future__ import annotations

from preprocessing.errors import InputError, MissingError

import contextlib
import io
import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from preprocessing import storage

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"
SVHN_TRAIN, SVHN_TEST = "train_32x32.mat", "test_32x32.mat"
N_CLASSES = 10


@dataclass
class Labelled:
    """(N, 32, 32, 3) uint8 RGB images, (N,) int64 labels in 0..9, and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray, source: str | None = None) -> "Labelled":
        return Labelled(self.images[idx], self.labels[idx], source or self.source)


def validate(images: np.ndarray, labels: np.ndarray, source: str, shape=(32, 32, 3), n_classes=N_CLASSES) -> None:
    """Shapes, dtype and label range of a labelled set, or a ValueError naming `source`."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise InputError(f"{source}: images have shape {images.shape}, expected (N, {', '.join(map(str, shape))})")
    if images.dtype != np.uint8:
        raise InputError(f"{source}: images are {images.dtype}, expected uint8")
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(f"{source}: {labels.shape} labels for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(f"{source}: labels range {labels.min()}..{labels.max()}, expected 0..{n_classes - 1}")


# ---------------------------------------------------------------------------------------------------- locations


@contextlib.contextmanager
def local_copy(uri: str, names: list[str] | None = None) -> Iterator[Path]:
    """A local path for `uri`: itself when local, else a temporary copy of the object (or of `names` under it)."""
    if not storage.is_s3(uri):
        p = storage.local_path(uri).expanduser()
        if not p.exists():
            raise MissingError(f"{uri}: no such file or directory")
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="dcgan-eval-") as tmp:
        if names is None or uri.endswith((".tar.gz", ".tgz", ".mat")):
            dst = Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]
            storage.download_file(uri, dst)
            yield dst
        else:
            available = {u.rsplit("/", 1)[-1]: u for u in storage.list_uris(uri)}
            for name in names:
                if name in available:
                    storage.download_file(available[name], Path(tmp) / name)
            yield Path(tmp)


# -------------------------------------------------------------------------------------------------------- CIFAR-10


def _reconstruct_fn():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # how Python 3 writes bytes at protocol 2
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]()
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


def _cifar_batch(data: bytes, source: str) -> Labelled:
    try:
        d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:
        raise InputError(f"{source}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise InputError(f"{source}: expected a dict with b'data' and b'labels', got {keys}")
    x = np.asarray(d[b"data"])
    y = np.asarray(d[b"labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072:
        raise InputError(f"{source}: b'data' has shape {x.shape}, expected (N, 3072) (32x32 RGB planes)")
    images = np.ascontiguousarray(x.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    validate(images, y, source)
    return Labelled(images, y, source)


def _cifar_files(root: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, source) for the six batch files in a directory or a .tar.gz."""
    wanted = set(CIFAR10_TRAIN + [CIFAR10_TEST])
    found: dict[str, tuple[bytes, str]] = {}
    if root.is_file():
        try:
            with tarfile.open(root, "r:*") as tar:
                for member in tar.getmembers():
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted:
                        found[base] = (tar.extractfile(member).read(), f"{root}:{member.name}")
        except tarfile.TarError as err:
            raise InputError(f"{root}: not a CIFAR-10 directory or .tar.gz ({err})") from None
    else:
        for d in (root, root / "cifar-10-batches-py"):
            for name in wanted - set(found):
                if (d / name).is_file():
                    found[name] = ((d / name).read_bytes(), str(d / name))
    missing = sorted(wanted - set(found))
    if missing:
        raise MissingError(
            f"{root}: CIFAR-10 files missing: {', '.join(missing)} (expected the python version: "
            f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, or its extracted directory)"
        )
    return found


def load_cifar10(uri: str) -> tuple[Labelled, Labelled]:
    """(train: 50,000, test: 10,000) from a CIFAR-10 python directory or .tar.gz, local or s3://."""
    with local_copy(uri, CIFAR10_TRAIN + [CIFAR10_TEST]) as root:
        files = _cifar_files(root)
    parts = [_cifar_batch(*files[n]) for n in CIFAR10_TRAIN]
    train = Labelled(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), f"{uri} (train)")
    return train, _cifar_batch(*files[CIFAR10_TEST])


# ------------------------------------------------------------------------------------------------------------ SVHN


def _svhn_mat(path: Path, source: str) -> Labelled:
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
    except Exception as err:
        raise InputError(f"{source}: not a readable .mat file ({err})") from None
    if "X" not in m or "y" not in m:
        raise InputError(f"{source}: expected variables 'X' and 'y', found {sorted(k for k in m if not k.startswith('__'))}")
    x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise InputError(f"{source}: X has shape {x.shape}, expected (32, 32, 3, N)")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise InputError(f"{source}: labels range {y.min()}..{y.max()}, expected 1..10 (10 = digit 0)")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8, copy=False)
    labels = np.where(y == 10, 0, y)
    validate(images, labels, source)
    return Labelled(images, labels, source)


def load_svhn(uri: str) -> tuple[Labelled, Labelled]:
    """(train: 73,257 non-extra, test: 26,032) from a directory holding train_32x32.mat and test_32x32.mat."""
    with local_copy(uri, [SVHN_TRAIN, SVHN_TEST]) as root:
        missing = [n for n in (SVHN_TRAIN, SVHN_TEST) if not (root / n).is_file()]
        if missing:
            raise MissingError(
                f"{uri}: SVHN files missing: {', '.join(missing)} (format 2 cropped digits from "
                f"http://ufldl.stanford.edu/housenumbers/)"
            )
        return _svhn_mat(root / SVHN_TRAIN, storage.join(uri, SVHN_TRAIN)), _svhn_mat(root / SVHN_TEST, storage.join(uri, SVHN_TEST))


def split_validation(train: Labelled, n_val: int = 10_000, seed: int = 0) -> tuple[Labelled, Labelled]:
    """(train, validation): `n_val` random images split off, as the authors' svhn_with_valid_set does."""
    if not 0 < n_val < len(train):
        raise InputError(f"{train.source}: cannot split {n_val} validation images off {len(train)}")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(order[n_val:], f"{train.source} (train)"), train.subset(order[:n_val], f"{train.source} (val)")
