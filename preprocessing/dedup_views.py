"""Multi-view semantic hashing (layer: preprocessing): each image hashed in several shifted and zoomed crops.

Why: the paper hashes one 32x32 center crop per image, and a copy shifted or re-cropped by a few pixels gives another
crop and, almost always, another code (benchmarks/dedup_quality.py: the single hash finds 3% of 1-4 px shift/crop
pairs). Here each image is also hashed in crops taken from its center square at twice the crop's resolution (64 px
for the 32-px crop), shifted by up to `SHIFT` px and zoomed in by `ZOOMS` px, each 2x2-pooled back to the crop size;
two images are duplicates when they share ANY code (a view of one equals the center view of the other). The first
view is exactly the paper's center-crop hash (the `hash` column); `views` takes the first V views of the fixed order
below (nearest views first), so `views: 1` is the paper's single hash.

Cost: V codes per image, encoded in one batched forward per chunk of images (a V x larger matmul), and V codes to
group, still linear in images x views (`semantic_hash.group_views`).
Units: shifts and zooms are pixels of the 2x source, i.e. of a 64-px stored image for crop 32 (1-4 px), and half a
pixel of a 32-px stored image (so 0.5-2 px there).
"""

from __future__ import annotations

import numpy as np

SHIFT = 4                   # largest shift of a view, in source pixels (Chebyshev radius)
ZOOMS = ((4, 4, 2), (8, 8, 4), (4, 0, 2), (0, 4, 2), (8, 4, 4), (4, 8, 4), (2, 2, 1), (6, 6, 3))
# (pixels added to the source's height, to its width, step of that zoom's shift grid); zoom shifts span +-zoom/2


def _view_list() -> list[tuple[int, int, int, int]]:
    """All views as (zoom_y, zoom_x, dy, dx), nearest first: center; shifts by ring 1..SHIFT; each zoom's grid."""
    out = [(0, 0, 0, 0)]
    for r in range(1, SHIFT + 1):
        ring = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if max(abs(dy), abs(dx)) == r]
        out += [(0, 0, dy, dx) for dy, dx in ring]
    for zy, zx, step in ZOOMS:
        ys, xs = range(-(zy // 2), zy // 2 + 1, step), range(-(zx // 2), zx // 2 + 1, step)
        out += [(zy, zx, dy, dx) for dy in ys for dx in xs]
    return out


VIEWS = _view_list()
MAX_VIEWS = len(VIEWS)         # 81 shifts + 54 zoomed = 135
DEFAULT_VIEWS = MAX_VIEWS       # measured: recall grows with every zoom grid added, no false positive (RESULTS.md)


def view_sources(images: np.ndarray, crop: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 2*crop, 2*crop, 3) uint8: the largest center square at twice the crop's side."""
    import cv2

    images = np.asarray(images)
    n, h, w, _ = images.shape
    side, size = min(h, w), 2 * crop
    y, x = (h - side) // 2, (w - side) // 2
    interp = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = cv2.resize(images[i, y:y + side, x:x + side], (size, size), interpolation=interp)
    return out


def view_crops(sources: np.ndarray, views: int):
    """(N, S, S, 3) uint8 sources -> (N, views-1, S/2, S/2, 3) float32: every view but the center one (view 0).

    View (zoom_y, zoom_x, dy, dx): the source resized to (S + zoom_y) x (S + zoom_x), padded by mirroring, the S x S window shifted by (dy, dx)
    from the center, 2x2-averaged. The 2x2 average of a window is a slice of one of four pooled copies of the padded
    source (one per parity of the window's corner), so each view costs a copy, not a pooling.
    """
    import cv2

    n, s = len(sources), sources.shape[1]
    c = s // 2
    wanted = VIEWS[1:views]
    out = np.empty((n, len(wanted), c, c, 3), np.float32)
    pad = SHIFT
    for zoom in sorted({v[:2] for v in wanted}):
        zy, zx = zoom
        scaled = sources if zoom == (0, 0) else np.stack(
            [cv2.resize(im, (s + zx, s + zy), interpolation=cv2.INTER_LINEAR) for im in sources])
        padded = np.pad(scaled, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric").astype(np.float32)
        pooled = {}
        for k, (vy, vx, dy, dx) in enumerate(wanted):
            if (vy, vx) != zoom:
                continue
            top, left = pad + zy // 2 + dy, pad + zx // 2 + dx
            key = (top % 2, left % 2)
            if key not in pooled:
                a = padded[:, key[0]:, key[1]:]
                h, w = a.shape[1] // 2 * 2, a.shape[2] // 2 * 2
                a = a[:, :h, :w]
                pooled[key] = 0.25 * (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2])
            y, x = top // 2, left // 2
            out[:, k] = pooled[key][:, y:y + c, x:x + c]
    return out


def _view_bits(state, x) -> "np.ndarray":
    """Bits of flattened raw views (M, D) float: the encoder on standardised inputs (`dedup_model.inputs_of`),
    computed as sign(W x - mean * W 1 + b * rms) so the standardised copy of the views is never written."""
    import torch

    from preprocessing.dedup_model import EPS, HashAutoencoder

    if isinstance(state, HashAutoencoder):
        state = state.folded_state()
    w, b = state["encoder.weight"], state["encoder.bias"]
    d = x.shape[1]
    mean = x.mean(dim=1, keepdim=True)
    var = (torch.linalg.vector_norm(x, dim=1, keepdim=True) ** 2 / d - mean ** 2).clamp_min(0)
    rms = var.sqrt().clamp_min(EPS * 255)
    return (x @ w.T - mean * w.sum(1) + rms * b) > 0


def encode_views(state, crops: np.ndarray, sources: np.ndarray | None, cfg, chunk: int = 64) -> np.ndarray:
    """Packed codes (N, cfg.views, code_bits/8): view 0 is `dedup_model.encode` of the center crops (the `hash`
    column), the others come from `sources` (`view_sources`), all views of a chunk of images in one forward."""
    import torch

    from preprocessing.dedup_model import encode
    from preprocessing.semantic_hash import pack_bits

    center = encode(state, crops, cfg)
    if cfg.views == 1:
        return center[:, None]
    if sources is None or len(sources) != len(crops):
        raise ValueError(f"views: {cfg.views} needs one view source per crop")
    out = np.empty((len(crops), cfg.views, center.shape[1]), np.uint8)
    out[:, 0] = center
    with torch.no_grad():
        for i in range(0, len(crops), chunk):
            v = torch.from_numpy(view_crops(sources[i:i + chunk], cfg.views))
            m = len(v)
            codes = pack_bits(_view_bits(state, v.reshape(m * (cfg.views - 1), -1)).numpy())
            out[i:i + m, 1:] = codes.reshape(m, cfg.views - 1, -1)
    return out


def image_codes(state, images: np.ndarray, cfg) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, cfg.views, code_bits/8) packed codes (view 0: the paper's center crop)."""
    from preprocessing.dedup_model import crops_of

    sources = view_sources(images, cfg.crop) if cfg.views > 1 else None
    return encode_views(state, crops_of(images, cfg.crop), sources, cfg)
