"""'Forgetting to draw' certain objects (paper section 6.3.1, figure 6).

Boxes drawn by a user around an object (windows, in the paper: 52 boxes over 150 samples) on the numbered sample
sheet label feature-map locations of G's second-highest layer: positives are locations whose receptive-field centre
lies inside a box, negatives random locations outside every box of the same images. A logistic regression on the
per-location channel vectors finds the maps that signal the object; those with positive weight are dropped (zeroed)
when generating, and the object tends to vanish or be replaced by something else.

Boxes JSON: {"boxes": {"<sample index>": [[x0, y0, x1, y1], ...], ...}} in the samples' own pixel coordinates
(0..resolution), x0 < x1, y0 < y1; indices are those of eval/step-NNNNNNN/sample_sheet.png.

Layer: dcgan.
"""

from __future__ import annotations

from preprocessing.errors import InputError

import contextlib
import json
from typing import Iterator

import numpy as np
import torch
from torch import nn

from dcgan.evaluation.latent import CONTEXT, context_z, render
from dcgan.sampling import batch_statistics
from preprocessing import storage

LAYER = -3  # forward_features: [projection, conv1, ..., image]; -2 is the highest hidden layer, -3 the second highest


def load_boxes(uri: str, n_samples: int, resolution: int) -> dict[int, list[tuple[float, float, float, float]]]:
    """Parse and check a boxes JSON (see module doc); errors name the file and the offending entry."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as err:
        raise InputError(f"{uri}: not valid JSON ({err})") from None
    boxes = data.get("boxes") if isinstance(data, dict) else None
    if not isinstance(boxes, dict) or not boxes:
        raise InputError(f"{uri}: expected {{\"boxes\": {{\"<sample index>\": [[x0, y0, x1, y1], ...]}}}}")
    out: dict[int, list[tuple[float, float, float, float]]] = {}
    for key, items in boxes.items():
        if not str(key).isdigit() or int(key) >= n_samples:
            raise InputError(f"{uri}: sample index {key!r} is not on the sheet (0..{n_samples - 1})")
        if not isinstance(items, list):
            raise InputError(f"{uri}: boxes of sample {key} must be a list of [x0, y0, x1, y1]")
        for b in items:
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                raise InputError(f"{uri}: sample {key}: box {b!r} is not [x0, y0, x1, y1]")
            x0, y0, x1, y1 = map(float, b)
            if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
                raise InputError(f"{uri}: sample {key}: box {b} is empty or outside the {resolution}x{resolution} image")
            out.setdefault(int(key), []).append((x0, y0, x1, y1))
    return out


def _layer_index(g: nn.Module, layer: int) -> int:
    n_outputs = len(g.blocks) + 1
    k = layer % n_outputs
    if not 0 <= k < n_outputs - 1:
        raise ValueError(f"layer {layer} is not a hidden layer of G (it has {n_outputs - 1} hidden outputs)")
    return k


@torch.no_grad()
def layer_features(g: nn.Module, z: torch.Tensor, layer: int = LAYER, context: int = CONTEXT) -> torch.Tensor:
    """G's activations at `layer` (N, C, h, w) under the same batch statistics as `render`."""
    ctx = context_z(g, context)
    with batch_statistics(g):
        feats = g.forward_features(torch.cat([z.to(ctx.device), ctx]))[_layer_index(g, layer)]
    return feats[: len(z)].float().cpu()


def location_labels(boxes: list[tuple[float, float, float, float]], side: int, resolution: int) -> np.ndarray:
    """(side, side) bool: feature-map locations whose centre, in image pixels, lies inside a box."""
    centres = (np.arange(side) + 0.5) * resolution / side
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    inside = np.zeros((side, side), bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return inside


def fit_object_maps(g: nn.Module, z_sheet: torch.Tensor, boxes: dict[int, list], layer: int = LAYER,
                    negatives_per_positive: int = 1, seed: int = 0) -> dict:
    """Logistic regression from per-location features to inside-a-box; returns the maps with positive weight."""
    idx = sorted(boxes)
    feats = layer_features(g, z_sheet[idx], layer)  # (n, C, h, w)
    n, c, side, _ = feats.shape
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for j, i in enumerate(idx):
        inside = location_labels(boxes[i], side, g.cfg.resolution)
        pos = np.argwhere(inside)
        neg_all = np.argwhere(~inside)
        if len(pos) == 0:
            raise ValueError(f"sample {i}: its boxes cover no location of the {side}x{side} feature map; draw larger boxes")
        neg = neg_all[rng.choice(len(neg_all), min(len(neg_all), negatives_per_positive * len(pos)), replace=False)]
        f = feats[j].permute(1, 2, 0).numpy()  # (h, w, C)
        xs += [f[pos[:, 0], pos[:, 1]], f[neg[:, 0], neg[:, 1]]]
        ys += [np.ones(len(pos)), np.zeros(len(neg))]
    x, y = np.concatenate(xs), np.concatenate(ys)
    from sklearn.linear_model import LogisticRegression  # a slow import: only where the suite runs

    clf = LogisticRegression(max_iter=2000).fit(x, y)
    weights = clf.coef_[0]
    drop = np.flatnonzero(weights > 0)
    return {"maps": drop.tolist(), "n_maps": int(c), "layer": layer, "side": int(side), "weights": weights,
            "train_accuracy": float(clf.score(x, y)), "positives": int(y.sum()), "negatives": int(len(y) - y.sum())}


@contextlib.contextmanager
def dropped_maps(g: nn.Module, maps: list[int], layer: int = LAYER) -> Iterator[nn.Module]:
    """Within the block, G's `layer` output has `maps` zeroed (a forward hook; G itself is unchanged)."""
    k = _layer_index(g, layer)
    module = g.project_bn if k == 0 else g.blocks[k - 1]  # k == 0: zero before the ReLU, same result
    index = torch.as_tensor(maps, dtype=torch.long)

    def hook(_m, _inp, out):
        out = out.clone()
        out[:, index.to(out.device)] = 0
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield g
    finally:
        handle.remove()


def forgetting_pairs(g: nn.Module, z: torch.Tensor, maps: list[int], layer: int = LAYER) -> torch.Tensor:
    """Images of z without and with the maps dropped, stacked [originals..., dropped...] for a 2-row grid."""
    before = render(g, z)
    with dropped_maps(g, maps, layer):
        after = render(g, z)
    return torch.cat([before, after])
