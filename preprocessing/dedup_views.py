"""Multi-view semantic hashing (layer: preprocessing): each image hashed in several shifted and zoomed crops.

Why: the paper hashes one 32x32 center crop per image, and a copy shifted or re-cropped by a few pixels gives another
crop and, almost always, another code (benchmarks/dedup_quality.py: the single hash finds 2% of 1-4 px shift/crop
pairs). Here each image is also hashed in crops cut from its center square at twice the crop's resolution (64 px for
the 32-px crop): shifted by up to `SHIFT` px, and zoomed in by 2-8 px (`ZOOMS`, some unequal in height and width, as a
re-crop gives) over a grid of shifts; each is 2x2-pooled back to the crop size. A view code shared by two images
makes them a candidate pair, which `dedup_verify` accepts or rejects on the two images' pixels aligned over those views
(`cut_views`). The first view is exactly the paper's center-crop hash (the `hash` column); `views: V` takes the first V
views of the fixed order below (nearest first): 1 = the paper's single hash, 9/25/49/81 = shifts up to 1/2/3/4 px,
135 = all (the default). Measured: benchmarks/dedup_scale.py, docs/dedup.md.

Cost: V codes per image, the views of a chunk of images as one dilated convolution per zoom (`_conv_bits`), and V
codes per image to group, linear in images x views.
Units: shifts and zooms are pixels of the 2x source, i.e. of a 64-px stored image for crop 32; for a 32-px stored
image they are half pixels (shifts up to 2 px there).
"""

from __future__ import annotations

import functools

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
DEFAULT_VIEWS = MAX_VIEWS       # recall grows with every zoom grid added (RESULTS.md); pairs are verified on pixels


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


def _pool2(a: np.ndarray, py: int = 0, px: int = 0) -> np.ndarray:
    """2x2 average of (N, H, W, C) starting at row py, column px (a trailing odd row/column is dropped)."""
    a = a[:, py:, px:]
    a = a[:, :a.shape[1] // 2 * 2, :a.shape[2] // 2 * 2]
    return 0.25 * (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2])


def _box_sums(plane: np.ndarray, ys: np.ndarray, xs: np.ndarray, c: int) -> np.ndarray:
    """Sums of (N, H, W) over the c x c windows with corners (ys, xs): (N, len(ys)), from one integral image."""
    ii = np.zeros((plane.shape[0], plane.shape[1] + 1, plane.shape[2] + 1))
    ii[:, 1:, 1:] = plane.cumsum(1).cumsum(2)
    return ii[:, ys + c, xs + c] - ii[:, ys, xs + c] - ii[:, ys + c, xs] + ii[:, ys, xs]


def view_inputs(sources: np.ndarray, views: int, pool: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every view but the center one (view 0) of (N, S, S, 3) uint8 sources, as the encoder needs it.

    Returns (pixels (N, views-1, D) float32: each S/2 x S/2 view, further `pool` x `pool` averaged (1 or 2), HWC
    flattened; mean and mean square of each S/2 x S/2 view (N, views-1), float64). View (zoom_y, zoom_x, dy, dx) is
    the S x S window, shifted by (dy, dx) from the center, of the source resized to (S + zoom_y) x (S + zoom_x) and
    padded by mirroring, 2x2-averaged. A 2x2 (4x4) average of a window is a window of one of 4 (16) pooled copies of
    the padded source, one per corner parity, so each view costs a copy, not a pooling; means from integral images.
    """
    import cv2

    n, s = len(sources), sources.shape[1]
    c = s // 2
    wanted = VIEWS[1:views]
    out = np.empty((n, len(wanted), c // pool, c // pool, 3), np.float32)
    mean, msq = np.empty((n, len(wanted))), np.empty((n, len(wanted)))
    pad = SHIFT
    for zoom in sorted({v[:2] for v in wanted}):
        zy, zx = zoom
        scaled = sources if zoom == (0, 0) else np.stack(
            [cv2.resize(im, (s + zx, s + zy), interpolation=cv2.INTER_LINEAR) for im in sources])
        padded = np.pad(scaled, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric").astype(np.float32)
        at: dict[tuple[int, int], list] = {}
        for k, (vy, vx, dy, dx) in enumerate(wanted):
            if (vy, vx) == zoom:
                top, left = pad + zy // 2 + dy, pad + zx // 2 + dx
                at.setdefault((top % 2, left % 2), []).append((k, top // 2, left // 2))
        for (py, px), members in at.items():
            p2 = _pool2(padded, py, px)
            ks, ys, xs = (np.array(v) for v in zip(*members))
            # p2 holds multiples of 1/4 up to 255: their squares and channel sums are exact in float32
            mean[:, ks] = _box_sums(p2.sum(-1, dtype=np.float64), ys, xs, c) / (3 * c * c)
            msq[:, ks] = _box_sums(np.einsum("nhwc,nhwc->nhw", p2, p2).astype(np.float64), ys, xs, c) / (3 * c * c)
            planes = {}
            for k, y, x in members:
                if pool == 1:
                    out[:, k] = p2[:, y:y + c, x:x + c]
                    continue
                q = (y % 2, x % 2)
                if q not in planes:
                    planes[q] = _pool2(p2, *q)
                out[:, k] = planes[q][:, y // 2:y // 2 + c // 2, x // 2:x // 2 + c // 2]
    return out.reshape(n, len(wanted), -1), mean, msq


def view_crops(sources: np.ndarray, views: int) -> np.ndarray:
    """(N, S, S, 3) uint8 sources -> (N, views-1, S/2, S/2, 3) float32: every view but the center one, as pixels."""
    c = sources.shape[1] // 2
    return view_inputs(sources, views)[0].reshape(len(sources), -1, c, c, 3)


def cut_views(sources: np.ndarray, views: np.ndarray) -> np.ndarray:
    """(M, S, S, 3) uint8 sources and a view index per source -> (M, S/2, S/2, 3) float32: that view's pixels.

    The same window as `view_inputs` (the source resized by the view's zoom, mirror-padded, shifted, 2x2-averaged),
    one view per row, so a candidate pair can be compared over exactly the alignment whose codes matched."""
    import cv2

    sources, views = np.asarray(sources), np.asarray(views, np.int64)
    m, s = len(sources), sources.shape[1]
    c = s // 2
    out = np.empty((m, c, c, 3), np.float32)
    for v in np.unique(views):
        rows = np.flatnonzero(views == v)
        zy, zx, dy, dx = VIEWS[int(v)]
        sub = sources[rows]
        if zy or zx:
            sub = np.stack([cv2.resize(im, (s + zx, s + zy), interpolation=cv2.INTER_LINEAR) for im in sub])
        top, left = SHIFT + zy // 2 + dy, SHIFT + zx // 2 + dx
        padded = np.pad(sub, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode="symmetric")
        out[rows] = _pool2(padded[:, top:top + s, left:left + s].astype(np.float32))
    return out


def _view_encoder(state, crop: int):
    """The folded encoder for the views: (A, B, w1, b, pool) with W x = A (B x_pool) on the `pool`-averaged view.

    With whitening, W's rows are combinations of 2x2-pooling rows (the basis reads the 2x2-pooled crop) and W has the
    basis's rank (32 of 3072 with `whiten: 32`): views are hashed from 16x16 pooled pixels through a rank-32
    factorisation, 3072 x 128 multiply-adds become 768 x 32 + 32 x 128. Without whitening: the plain W."""
    import torch

    from preprocessing.dedup_model import HashAutoencoder, pooling_matrix

    if isinstance(state, HashAutoencoder):
        state = state.folded_state()
    w, b = state["encoder.weight"].double(), state["encoder.bias"].float()
    w1, pool = w.sum(1).float(), 1
    p = pooling_matrix(crop)
    if p.shape[0] < p.shape[1]:
        wp = w @ p.T * (p.shape[1] / p.shape[0])  # W P+ (P's rows are orthogonal, each of squared norm 1/4)
        if torch.linalg.matrix_norm(wp @ p - w) <= 1e-4 * torch.linalg.matrix_norm(w):
            w, pool = wp, 2
    values, u = torch.linalg.eigh(w @ w.T)              # W = U U^T W: the left singular vectors, cheaply
    keep = values > values.max().clamp_min(0) * 1e-12
    rank = int(keep.sum())
    if rank * (w.shape[0] + w.shape[1]) >= w.shape[0] * w.shape[1]:
        return None, w.float(), w1, b, pool
    u = u[:, keep]
    return u.float(), (u.T @ w).float(), w1, b, pool


def _view_bits(encoder, x, mean, msq):
    """Bits of the views (M, D) float: the encoder on standardised inputs (`dedup_model.inputs_of`), computed as
    sign(W x - mean W 1 + b rms) so no standardised copy of the views is written."""
    from preprocessing.dedup_model import EPS

    a, bmat, w1, b, _ = encoder
    rms = (msq - mean ** 2).clamp_min(0).sqrt().clamp_min(EPS * 255).float()
    wx = x @ bmat.T if a is None else (x @ bmat.T) @ a.T
    return (wx - mean.float() * w1 + rms * b) > 0


@functools.lru_cache(maxsize=64)
def _selector(corners: tuple[int, ...], length: int, c: int, stride: int):
    """(len(corners), length) 0/1 rows: row i picks c indices `stride` apart from corners[i]."""
    import torch

    out = torch.zeros(len(corners), length)
    for i, t in enumerate(corners):
        out[i, t:t + stride * c:stride] = 1
    return out


def _window_sums(plane, ty: np.ndarray, tx: np.ndarray, c: int, stride: int = 2):
    """Sums of (N, H, W) planes over the c x c windows of every `stride`-th row/column from the corners
    (ty[i], tx[j]): (N, len(ty), len(tx)), as two 0/1 matmuls."""
    n, h, w = plane.shape
    rows = _selector(tuple(int(t) for t in ty), h, c, stride)
    cols = _selector(tuple(int(t) for t in tx), w, c, stride)
    x = (plane.reshape(n * h, w) @ cols.T).reshape(n, h, -1).transpose(1, 2).reshape(-1, h) @ rows.T
    return x.reshape(n, len(tx), len(ty)).transpose(1, 2)


def _mirror(n: int, pad: int):
    """Row indices of a length-n axis padded by `pad` on both sides as numpy's "symmetric" mode does."""
    import torch

    i = torch.arange(-pad, n + pad)
    return torch.where(i < 0, -i - 1, torch.where(i >= n, 2 * n - 1 - i, i))


def _conv_bits(encoder, sources: np.ndarray, views: int) -> "torch.Tensor":
    """Bits (N, views-1, code_bits) of every view but the center, as one dilated convolution per zoom (issue 19).

    A view's hash input is its 16x16 grid of 4x4 source-pixel means and the encoder's rank-32 factor B is a set of 32
    16x16x3 kernels, so B x over all views of a zoom (a grid of shifts) is ONE convolution (dilation 4, stride = the
    zoom's grid step) of the 4x4-summed source: the views share it, ~3.4M multiply-adds per image for 134 views, done
    by oneDNN's direct convolution (no im2col copy); a 33rd all-ones kernel gives each view's mean (exact: integer
    sums below 2**24). The mean square (of the view's 32x32 2x2-averaged pixels, as `view_inputs` gives it) is a
    window sum of one plane, read for the whole grid at once as two 0/1 matmuls. Box sums are shifted adds of flat
    buffers; a zoom whose views all start on even pixels (6 of the 8) is done on the even grid only, a quarter of the
    plane (dilation 2). Codes equal those of `view_inputs` + `_view_bits` up to float rounding (tests/test_dedup.py);
    benchmarks/dedup_scale.py measures the speed against the previous (im2col) and first (numpy) paths."""
    import cv2
    import torch
    import torch.nn.functional as F

    from preprocessing.dedup_model import EPS

    a, bmat, w1, b, _ = encoder
    n, s = len(sources), sources.shape[1]
    c, k = s // 2, s // 4
    kern = bmat.reshape(-1, k, k, 3).permute(0, 3, 1, 2) / 16          # (rank, 3, k, k), on 16 x the 4x4 means
    kern = torch.cat([kern, torch.full((1, 3, k, k), 1 / 16)]).contiguous()  # + the sum of the 4x4 means (exact)
    wanted = VIEWS[1:views]
    proj = torch.empty(n, len(wanted), bmat.shape[0])
    mean, msq = torch.empty(n, len(wanted)), torch.empty(n, len(wanted))
    src = torch.from_numpy(np.ascontiguousarray(sources))
    for zy, zx, step in ((0, 0, 1),) + ZOOMS:
        ks = [i for i, v in enumerate(wanted) if v[:2] == (zy, zx)]
        if not ks:
            continue
        if (zy, zx) == (0, 0):   # shifts read up to SHIFT px beyond the source: mirror-padded as `view_inputs` does
            m = _mirror(s, SHIFT)
            region = src.index_select(1, m).index_select(2, m)
        else:                    # a zoom's grid spans +-zoom/2 of the (s + zoom)-px resized source: no padding
            scaled = np.empty((n, s + zy, s + zx, 3), np.uint8)
            for i, im in enumerate(sources):
                cv2.resize(im, (s + zx, s + zy), dst=scaled[i], interpolation=cv2.INTER_LINEAR)
            region = torch.from_numpy(scaled)
        ry, rx = (SHIFT, SHIFT) if (zy, zx) == (0, 0) else (zy // 2, zx // 2)  # the grid's half-extent
        hh, ww = region.shape[1:3]
        size = hh * ww
        ty = np.array([wanted[i][2] for i in ks]) + ry
        tx = np.array([wanted[i][3] for i in ks]) + rx
        f = region.permute(0, 3, 1, 2).contiguous().reshape(-1).float()   # (uint8 transposed first: 2x faster)
        if not (ty % 2).any() and not (tx % 2).any():
            # every view starts on an even pixel: only the 2x2 sums on the even grid are read, a quarter of the plane
            x = f.reshape(n, 3, hh, ww)
            q = x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]  # p2, even grid
            h = q[..., :-1, :] + q[..., 1:, :]
            a4 = h[..., :-1] + h[..., 1:]                                 # a4 on the even grid
            ty, tx, st, dil, stride = ty // 2, tx // 2, max(step // 2, 1), 2, 1
            sq = q * q
            plane = sq[:, 0] + sq[:, 1] + sq[:, 2]
        else:
            # box sums as shifted adds of the flat NCHW buffer (long contiguous runs; the wrapped last rows/columns
            # of each plane are never read): p2 = 4 x the 2x2 means, a4 = 16 x the 4x4 means, exact in float32
            h = f[:-1] + f[1:]
            p2 = h[:-ww] + h[ww:]
            h = p2[:-2] + p2[2:]
            shape, strides = (n, 3, hh - 3, ww - 3), (3 * size, size, ww, 1)
            a4 = torch.as_strided(h, shape, strides) + torch.as_strided(h, shape, strides, 2 * ww)  # contiguous
            st, dil, stride = step, 4, 2
            sq = p2 * p2                                                  # mean square: window sums of 2x2 means^2
            sq = sq[:-2 * size] + sq[size:-size] + sq[2 * size:]          # summed over channels
            plane = torch.as_strided(sq, (n, hh - 1, ww - 1), (3 * size, ww, 1))
        grid = F.conv2d(a4, kern, stride=st, dilation=dil).flatten(2)     # (n, rank + 1, gy*gx): all views at once
        gx = (a4.shape[-1] - dil * (k - 1) - 1) // st + 1
        at = grid.index_select(2, torch.from_numpy((ty // st) * gx + tx // st)).transpose(1, 2)
        proj[:, ks] = at[..., :-1]
        mean[:, ks] = (at[..., -1].double() * 4 / (c * c) / 3).float()   # sum of 4x4 means: exact, as view_inputs
        uy, ux = np.unique(ty), np.unique(tx)                              # the zoom's views: a grid uy x ux
        sums = _window_sums(plane, uy, ux, c, stride) / (16 * c * c * 3)
        msq[:, ks] = sums[:, np.searchsorted(uy, ty), np.searchsorted(ux, tx)].float()
    rms = (msq - mean ** 2).clamp_min(0).sqrt().clamp_min(EPS * 255)
    wx = proj @ a.T
    return (wx - mean[..., None] * w1 + rms[..., None] * b) > 0


def encode_views(state, crops: np.ndarray, sources: np.ndarray | None, cfg, chunk: int = 64) -> np.ndarray:
    """Packed codes (N, cfg.views, code_bits/8): view 0 is `dedup_model.encode` of the center crops (the `hash`
    column), the others come from `sources` (`view_sources`), all views of a chunk of images in one matmul."""
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
    encoder = _view_encoder(state, cfg.crop)
    with torch.no_grad():
        for i in range(0, len(crops), chunk):
            if encoder[0] is not None and encoder[-1] == 2:  # whitened (the default): the convolution path
                out[i:i + chunk, 1:] = pack_bits(_conv_bits(encoder, sources[i:i + chunk], cfg.views).numpy()
                                                 .reshape(-1, encoder[2].shape[0])).reshape(-1, cfg.views - 1,
                                                                                            center.shape[1])
                continue
            x, mean, msq = (torch.from_numpy(v) for v in view_inputs(sources[i:i + chunk], cfg.views, encoder[-1]))
            m, v = x.shape[:2]
            bits = _view_bits(encoder, x.reshape(m * v, -1), mean.reshape(-1, 1), msq.reshape(-1, 1))
            out[i:i + m, 1:] = pack_bits(bits.numpy()).reshape(m, v, -1)
    return out


def image_codes(state, images: np.ndarray, cfg) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, cfg.views, code_bits/8) packed codes (view 0: the paper's center crop)."""
    from preprocessing.dedup_model import crops_of

    sources = view_sources(images, cfg.crop) if cfg.views > 1 else None
    return encode_views(state, crops_of(images, cfg.crop), sources, cfg)
