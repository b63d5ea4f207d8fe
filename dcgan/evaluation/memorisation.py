"""Is G copying its training set? Nearest training images of samples, in pixels and in D-feature space.

Also the authors' monitoring metric (their lib/metrics.nnd_score, logged each epoch): the mean Euclidean distance,
over flattened [-1, 1] pixels, from each real image to its nearest sample; and the other direction, from each sample
to its nearest real image, which is the one that falls when samples copy training images. Both are reported.

Layer: dcgan.
"""

from __future__ import annotations

import numpy as np
import torch

from dcgan.evaluation.features import extract_features


def _flat_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images).reshape(len(images), -1).float().div_(127.5).sub_(1.0)


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query row's nearest row of `ref`, Euclidean, in chunks of the reference."""
    best_d = torch.full((len(query),), float("inf"))
    best_i = torch.zeros(len(query), dtype=torch.long)
    for start in range(0, len(ref), chunk):
        d = torch.cdist(query, ref[start : start + chunk])
        v, i = d.min(1)
        better = v < best_d
        best_d[better], best_i[better] = v[better], i[better] + start
    exact = (query - ref[best_i]).norm(dim=1)  # cdist's matmul form loses ~1e-2 near 0; a copy must read 0
    return exact.numpy(), best_i.numpy()


def _stats(d: np.ndarray) -> dict:
    return {"mean": float(d.mean()), "median": float(np.median(d)), "min": float(d.min()), "max": float(d.max())}


def memorisation(samples: np.ndarray, real: np.ndarray, d: torch.nn.Module | None = None, show: int = 8) -> dict:
    """Nearest real images of uint8 NHWC samples, in pixel space and (with D) in D-feature space.

    Returns statistics, and "grid" (uint8 NHWC) rows of: `show` samples, their nearest real image in pixels, and
    in D features. D should already be in eval mode with representative BatchNorm statistics.
    """
    sp, rp = _flat_pixels(samples), _flat_pixels(real)
    d_pix, i_pix = nearest(sp, rp)
    d_real_to_sample, _ = nearest(rp, sp)
    out = {
        "n_samples": int(len(samples)),
        "n_real": int(len(real)),
        "pixel_nn_distance": _stats(d_pix),
        "nnd_samples_to_real": float(d_pix.mean()),
        "nnd_real_to_samples": float(d_real_to_sample.mean()),  # the authors' nnd_score(samples, real)
    }
    rows = [samples[:show], real[i_pix[:show]]]
    if d is not None:
        fs = torch.as_tensor(extract_features(d, samples, name="samples"))
        fr = torch.as_tensor(extract_features(d, real, name="real images"))
        d_feat, i_feat = nearest(fs, fr)
        out["feature_nn_distance"] = _stats(d_feat)
        out["feature_nn_same_as_pixel_nn"] = float(np.mean(i_feat == i_pix))
        rows.append(real[i_feat[:show]])
    out["grid"] = np.concatenate(rows)
    out["grid_nrow"] = min(show, len(samples))
    return out
