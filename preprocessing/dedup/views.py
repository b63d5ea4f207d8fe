"""Multi-view semantic hashing (layer: preprocessing): each image hashed in several shifted and zoomed crops.

Why: the paper hashes one 32x32 center crop per image, and a copy shifted or re-cropped by a few pixels gives another
crop and, almost always, another code (benchmarks/dedup_quality.py: the single hash finds 2% of 1-4 px shift/crop
pairs). Here each image is also hashed in crops cut from its center square at twice the crop's resolution (64 px for
the 32-px crop): shifted by up to `SHIFT` px, and zoomed in by 2-8 px (`ZOOMS`, some unequal in height and width, as a
re-crop gives) over a grid of shifts; each is 2x2-pooled back to the crop size. A view code shared by two images
makes them a candidate pair, which `verify` accepts or rejects on the two images' pixels aligned over those views
(`cut_views`); so does a code one bit away at one of a view's least certain bits (`encode_views_probed`). The first
view is exactly the paper's center-crop hash (the `hash` column); `views: V` takes the first V views of the fixed
order below (nearest first): 1 = the paper's single hash, 9/25/49/81 = shifts up to 1/2/3/4 px,
135 = all (the default). Measured: benchmarks/dedup_scale.py, docs/dedup.md.

Cost: V codes per image, the views of a chunk of images as one dilated convolution per zoom (`_conv_bits`), and V
codes per image to group, linear in images x views.
Units: shifts and zooms are pixels of the 2x source, i.e. of a 64-px stored image for crop 32; for a 32-px stored
image they are half pixels (shifts up to 2 px there).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from preprocessing.dedup.grid import SHIFT, VIEWS, ZOOMS

SMALL_GRID = 6         # a zoom with at most this many views is projected by one matmul, not a convolution

if TYPE_CHECKING:  # annotations only: torch is imported where the codes are computed
    import torch


def crops_of(images: np.ndarray, crop: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, crop, crop, 3) uint8: the largest center square, area-downsampled to crop x crop
    (the paper's 32x32 center crop). Here, without torch: a dedup's crops task runs it on a fresh worker."""
    import cv2

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    return _center_squares(images, crop, cv2.INTER_AREA)


def view_sources(images: np.ndarray, crop: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 2*crop, 2*crop, 3) uint8: the largest center square at twice the crop's side."""
    import cv2

    images = np.asarray(images)
    size = 2 * crop
    return _center_squares(images, size, cv2.INTER_AREA if min(images.shape[1:3]) >= size else cv2.INTER_LINEAR)


def _center_squares(images: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8: each image's largest center square resized to size x size."""
    import cv2

    n, h, w, _ = images.shape
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = cv2.resize(images[i, y:y + side, x:x + side], (size, size), interpolation=interpolation)
    return out


def _pool2(a: np.ndarray, py: int = 0, px: int = 0) -> np.ndarray:
    """2x2 average of (N, H, W, C) starting at row py, column px (a trailing odd row/column is dropped). uint8 pixels
    are summed in uint16 (four of them stay below 2**16) and give float32: the same values as on their float32 copy,
    without making one."""
    a = a[:, py:, px:]
    a = a[:, :a.shape[1] // 2 * 2, :a.shape[2] // 2 * 2]
    if a.dtype == np.uint8:
        pairs = a[:, 0::2].astype(np.uint16)
        pairs += a[:, 1::2]
        return (pairs[:, :, 0::2] + pairs[:, :, 1::2]) * np.float32(0.25)
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
        if zy or zx:  # a zoom's windows lie inside the resized source: no padding
            top, left = zy // 2 + dy, zx // 2 + dx
            window = np.empty((len(rows), s, s, 3), np.uint8)
            for i, r in enumerate(rows):
                resized = cv2.resize(sources[r], (s + zx, s + zy), interpolation=cv2.INTER_LINEAR)
                window[i] = resized[top:top + s, left:left + s]
        else:         # a shift reads up to SHIFT px beyond the source, mirrored
            padded = np.pad(sources[rows], ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode="symmetric")
            window = padded[:, SHIFT + dy:SHIFT + dy + s, SHIFT + dx:SHIFT + dx + s]
        out[rows] = _pool2(window)
    return out


def _view_encoder(state, crop: int):
    """The folded encoder for the views: (A, B, w1, b, pool) with W x = A (B x_pool) on the `pool`-averaged view.

    With whitening, W's rows are combinations of 2x2-pooling rows (the basis reads the 2x2-pooled crop) and W has the
    basis's rank (32 of 3072 with `whiten: 32`): views are hashed from 16x16 pooled pixels through a rank-32
    factorisation, 3072 x 128 multiply-adds become 768 x 32 + 32 x 128. Without whitening: the plain W."""
    import torch

    from preprocessing.dedup.model import HashAutoencoder, pooling_matrix

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


_ENCODERS: dict[bytes, tuple] = {}   # `_view_encoder`s of this process, by the weights they were made from


def _view_encoder_of(folded: dict, crop: int):
    """`_view_encoder` of a folded state, made once per process for the same weights: a worker encodes shard after
    shard with one model, and made the factorisation (an eigendecomposition) again for each; a hit only hashes the
    weights (1.5 MB at crop 32)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name in ("encoder.weight", "encoder.bias"):
        digest.update(folded[name].detach().cpu().contiguous().numpy().tobytes())
    key = digest.digest() + crop.to_bytes(4, "little")
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one model at a time: a later dedup's weights replace the last one's
        _ENCODERS[key] = _view_encoder(folded, crop)
    return _ENCODERS[key]


def _view_bits(encoder, x, mean, msq):
    """Bits of the views (M, D) float (`_view_scores` > 0)."""
    return _view_scores(encoder, x, mean, msq) > 0


def _view_scores(encoder, x, mean, msq):
    """Code-layer pre-activations of the views (M, D) float, times each view's RMS contrast: the encoder on
    standardised inputs (`model.inputs_of`), computed as W x - mean W 1 + b rms so no standardised copy of the views
    is written."""
    from preprocessing.dedup.model import EPS

    a, bmat, w1, b, _ = encoder
    rms = (msq - mean ** 2).clamp_min(0).sqrt().clamp_min(EPS * 255).float()
    wx = x @ bmat.T if a is None else (x @ bmat.T) @ a.T
    return wx - mean.float() * w1 + rms * b


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


def _conv_bits(encoder, sources: np.ndarray, views: int) -> "torch.Tensor":
    """Bits (N, views-1, code_bits) of every view but the center (`_conv_scores` > 0)."""
    return _conv_scores(encoder, sources, views) > 0


def _conv_scores(encoder, sources: np.ndarray, views: int) -> "torch.Tensor":
    """Code-layer pre-activations (N, views-1, code_bits), times each view's RMS contrast, of every view but the
    center, as one dilated convolution per zoom (issue 19).

    A view's hash input is its 16x16 grid of 4x4 source-pixel means and the encoder's rank-32 factor B is a set of 32
    16x16x3 kernels, so B x over all views of a zoom (a grid of shifts) is ONE convolution (dilation 4, stride = the
    zoom's grid step) of the 4x4-summed source: the views share it, ~3.4M multiply-adds per image for 134 views; a
    33rd all-ones kernel gives each view's mean (exact: integer sums below 2**24). The mean square (of the view's
    32x32 2x2-averaged pixels, as `view_inputs` gives it) is a window sum of one plane, read for the whole grid at once
    as two 0/1 matmuls. Box sums are OpenCV box filters over the chunk stacked as one tall channels-last image (one
    call per zoom; the rows that straddle two images are never read) and the convolution reads them channels-last, so
    no plane is transposed or copied; a zoom whose views all start on even pixels (6 of the 8) is done on the even
    grid only, a quarter of the plane (dilation 2). Codes equal those of `view_inputs` + `_view_bits` up to float
    rounding (tests/test_dedup.py); benchmarks/dedup_scale.py measures the speed against the previous and first
    paths."""
    import cv2
    import torch
    import torch.nn.functional as F

    from preprocessing.dedup.model import EPS

    a, bmat, w1, b, _ = encoder
    n, s = len(sources), sources.shape[1]
    c, k = s // 2, s // 4
    kern = bmat.reshape(-1, k, k, 3).permute(0, 3, 1, 2) / 16          # (rank, 3, k, k), on 16 x the 4x4 means
    kern = torch.cat([kern, torch.full((1, 3, k, k), 1 / 16)]).contiguous(memory_format=torch.channels_last)
    wanted = VIEWS[1:views]
    ats, msqs, order = [], [], []                                       # per zoom; put in view order at the end
    ones = np.ones((1, 3), np.float32)
    box = functools.partial(cv2.boxFilter, anchor=(0, 0), normalize=False, borderType=cv2.BORDER_REPLICATE)
    for zy, zx, step in ((0, 0, 1),) + ZOOMS:
        ks = [i for i, v in enumerate(wanted) if v[:2] == (zy, zx)]
        if not ks:
            continue
        hh, ww = s + max(zy, 2 * SHIFT * (zy == zx == 0)), s + max(zx, 2 * SHIFT * (zy == zx == 0))
        region = np.empty((n, hh, ww, 3), np.uint8)
        for i, im in enumerate(sources):
            if (zy, zx) == (0, 0):  # shifts read up to SHIFT px beyond the source: mirrored as `view_inputs` pads
                cv2.copyMakeBorder(im, SHIFT, SHIFT, SHIFT, SHIFT, cv2.BORDER_REFLECT, dst=region[i])
            else:                   # a zoom's grid spans +-zoom/2 of the (s + zoom)-px resized source: no padding
                cv2.resize(im, (ww, hh), dst=region[i], interpolation=cv2.INTER_LINEAR)
        ry, rx = (SHIFT, SHIFT) if (zy, zx) == (0, 0) else (zy // 2, zx // 2)  # the grid's half-extent
        ty = np.array([wanted[i][2] for i in ks]) + ry
        tx = np.array([wanted[i][3] for i in ks]) + rx
        tall = region.reshape(n * hh, ww, 3)
        if not (ty % 2).any() and not (tx % 2).any():
            # every view starts on an even pixel: only the 2x2 means on the even grid are read, a quarter of the plane
            hh, ww = hh // 2, ww // 2
            quad = tall.astype(np.uint16)
            quad <<= 2  # INTER_AREA halves 4 x the pixels to their exact 2x2 sums (uint8 would round the means):
            # cheaper than halving a float32 copy
            s2 = cv2.resize(quad, (ww, n * hh), interpolation=cv2.INTER_AREA)
            p2 = s2.astype(np.float32)                                    # 4 x the 2x2 means, exact
            a4 = box(s2, cv2.CV_32F, (2, 2))                              # 16 x the 4x4 means, on the even grid
            ty, tx, st, dil, stride = ty // 2, tx // 2, max(step // 2, 1), 2, 1
        else:
            p2 = box(tall, cv2.CV_32F, (2, 2))                            # 4 x the 2x2 means, exact
            a4 = box(tall, cv2.CV_32F, (4, 4))                            # 16 x the 4x4 means, exact
            st, dil, stride = step, 4, 2
        plane = torch.from_numpy(cv2.transform(p2 * p2, ones)).view(n, hh, ww)  # summed over channels
        x = torch.from_numpy(a4).view(n, hh, ww, 3).permute(0, 3, 1, 2)   # channels-last, no copy
        edge = 3 if dil == 4 else 1                  # last rows/columns of a box: they straddle two images
        gy, gx = (hh - edge - dil * (k - 1) - 1) // st + 1, (ww - edge - dil * (k - 1) - 1) // st + 1
        if gy * gx > SMALL_GRID:
            grid = F.conv2d(x[..., :hh - edge, :ww - edge], kern, stride=st, dilation=dil)  # channels-last out:
            grid = grid.permute(0, 2, 3, 1).reshape(n, gy * gx, -1)                      # (n, views, rank+1), a view
        else:  # a few views: oneDNN's convolution costs more than copying their windows for one matmul
            win = torch.from_numpy(a4).as_strided((n, gy, gx, k, k, 3), (hh * ww * 3, st * ww * 3, st * 3,
                                                                         dil * ww * 3, dil * 3, 1))
            grid = (win.reshape(n * gy * gx, -1) @ kern.permute(0, 2, 3, 1).reshape(len(kern), -1).T
                    ).reshape(n, gy * gx, -1)
        ats.append(grid.index_select(1, torch.from_numpy((ty // st) * gx + tx // st)))
        uy, ux = np.unique(ty), np.unique(tx)                              # the zoom's views: a grid uy x ux
        sums = _window_sums(plane, uy, ux, c, stride) / (16 * c * c * 3)  # p2 is 4 x the means
        msqs.append(sums.flatten(1).index_select(1, torch.from_numpy(np.searchsorted(uy, ty) * len(ux)
                                                                     + np.searchsorted(ux, tx))))
        order += ks
    back = torch.from_numpy(np.argsort(order))
    at = torch.cat(ats, 1).index_select(1, back)                         # (n, views, rank + 1) in view order
    msq = torch.cat(msqs, 1).index_select(1, back)
    mean = (at[..., -1].double() * 4 / (c * c) / 3).float()             # sum of 4x4 means: exact, as view_inputs
    rms = (msq - mean ** 2).clamp_min(0).sqrt().clamp_min(EPS * 255)
    # W x - mean W 1 + rms b as ONE matmul: [B x, mean, rms] @ [A^T; -W 1; b] (three passes over the
    # (images, views, bits) output saved)
    at[..., -1] = mean                                                   # (at is a fresh tensor: reused)
    lhs = torch.cat([at, rms[..., None]], -1)
    return lhs @ torch.cat([a.T, -w1[None], b[None]])


def encode_views(state, crops: np.ndarray, sources: np.ndarray | None, cfg, chunk: int = 64) -> np.ndarray:
    """Packed codes (N, cfg.views, code_bits/8): view 0 is `model.encode` of the center crops (the `hash`
    column), the others come from `sources` (`view_sources`), all views of a chunk of images in one matmul."""
    return _encode(state, crops, sources, cfg, chunk, 0)[0]


def encode_views_probed(state, crops: np.ndarray, sources: np.ndarray | None, cfg, chunk: int = 64
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(codes as `encode_views`, flips (N, cfg.views, cfg.probes) uint8): each view's `cfg.probes` least certain bits
    (`least_certain`). The code with one of them flipped is a probe: multi-probe hashing (Lv et al., VLDB 2007), the
    codes one bit away that a slightly shifted copy most likely has (`groups.probe_codes`)."""
    return _encode(state, crops, sources, cfg, chunk, cfg.probes)


def least_certain(scores, scale, probes: int) -> np.ndarray:
    """(..., bits) pre-activations and (bits,) weight norms -> (..., probes) uint8: the bits whose input lies nearest
    their hyperplane (|score| / ||w_b||; a view's contrast scales all its bits alike), nearest first.

    One numpy argmin per probe, the bit found masked before the next. `torch.topk` (a partial sort of each row's 128
    values, after a torch division) made the two probes cost 10% on top of a 135-view encode; now 4-5%
    (`benchmarks/dedup_scale.py --parts encode`, "the probes' least certain bits add")."""
    shape = scores.shape[:-1]
    if probes == 0:
        return np.zeros((*shape, 0), np.uint8)
    dist = np.abs(np.asarray(scores)).reshape(-1, scores.shape[-1])  # a fresh array: masked below
    dist /= np.asarray(scale, dist.dtype)
    rows, out = np.arange(len(dist)), np.empty((len(dist), probes), np.uint8)
    for p in range(probes):
        out[:, p] = nearest = dist.argmin(1)
        dist[rows, nearest] = np.inf
    return out.reshape(*shape, probes)


def _encode(state, crops, sources, cfg, chunk: int, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, views, bytes) and flips (N, views, probes) of every view."""
    import torch

    from preprocessing.dedup.model import HashAutoencoder, code_scores
    from preprocessing.dedup.semantic_hash import pack_bits

    folded = state.folded_state() if isinstance(state, HashAutoencoder) else state
    scale = folded["encoder.weight"].float().norm(dim=1)
    n, nbytes = len(crops), (len(scale) + 7) // 8
    out = np.empty((n, cfg.views, nbytes), np.uint8)
    flips = np.zeros((n, cfg.views, probes), np.uint8)
    i = 0
    for z in code_scores(state, crops):  # view 0: `model.encode`'s codes
        out[i:i + len(z), 0] = pack_bits((z > 0).numpy())
        flips[i:i + len(z), 0] = least_certain(z, scale, probes)
        i += len(z)
    if cfg.views == 1:
        return out, flips
    if sources is None or len(sources) != n:
        raise ValueError(f"views: {cfg.views} needs one view source per crop")
    encoder = _view_encoder_of(folded, cfg.crop)
    with torch.no_grad():
        for i in range(0, n, chunk):
            if encoder[0] is not None and encoder[-1] == 2:  # whitened (the default): the convolution path
                z = _conv_scores(encoder, sources[i:i + chunk], cfg.views)
            else:
                x, mean, msq = (torch.from_numpy(v) for v in view_inputs(sources[i:i + chunk], cfg.views, encoder[-1]))
                m, v = x.shape[:2]
                z = _view_scores(encoder, x.reshape(m * v, -1), mean.reshape(-1, 1), msq.reshape(-1, 1))
                z = z.reshape(m, v, -1)
            m, z = len(z), z.numpy()
            out[i:i + m, 1:] = pack_bits((z > 0).reshape(-1, z.shape[-1])).reshape(m, cfg.views - 1, nbytes)
            flips[i:i + m, 1:] = least_certain(z, scale, probes)
    return out, flips


def image_codes(state, images: np.ndarray, cfg, probed: bool = False):
    """(N, H, W, 3) uint8 images -> (N, cfg.views, code_bits/8) packed codes (view 0: the paper's center crop); with
    `probed`, (codes, flips) as `encode_views_probed`."""
    sources = view_sources(images, cfg.crop) if cfg.views > 1 else None
    encode = encode_views_probed if probed else encode_views
    return encode(state, crops_of(images, cfg.crop), sources, cfg)
