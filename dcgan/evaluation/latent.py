"""The paper's latent-space experiments (section 6): walks, numbered sample sheets, and vector arithmetic.

Images are rendered with BatchNorm on batch statistics, as the authors always sampled, but inside a fixed context of
random z, so that a picture does not depend on which few other z share its batch (a 3x3 arithmetic grid of nearly
equal z would otherwise normalise itself to noise).

Layer: dcgan.
"""

from __future__ import annotations

from preprocessing.errors import InputError

import re

import cv2
import numpy as np
import torch
from torch import nn

from dcgan.networks import sample_z
from dcgan.sampling import batch_statistics, to_uint8

CONTEXT = 256  # random z rendered alongside, for representative batch statistics
CONTEXT_SEED = 1234  # the same context z everywhere, so `render` and forgetting's feature maps share batch statistics
SHEET_SEED = 0  # the numbered sample sheet is reproducible: the same z every time


def _device(g: nn.Module) -> torch.device:
    return next(g.parameters()).device


def context_z(g: nn.Module, n: int = CONTEXT, seed: int = CONTEXT_SEED) -> torch.Tensor:
    """The fixed random z rendered alongside the z of interest, on G's device."""
    return sample_z(g.cfg, n, generator=torch.Generator().manual_seed(seed)).to(_device(g))


@torch.no_grad()
def render(g: nn.Module, z: torch.Tensor, context: int = CONTEXT, seed: int = CONTEXT_SEED, chunk: int = 256
           ) -> torch.Tensor:
    """G(z) (float NCHW in [-1, 1], on the CPU), batch statistics taken over z plus `context` fixed random z."""
    device = _device(g)
    ctx = context_z(g, context, seed) if context else None
    outs = []
    with batch_statistics(g):
        for i in range(0, len(z), chunk):
            part = z[i : i + chunk].to(device)
            batch = torch.cat([part, ctx]) if ctx is not None else part
            outs.append(g(batch)[: len(part)].float().cpu())
    return torch.cat(outs)


def sheet_z(g: nn.Module, n: int, seed: int = SHEET_SEED) -> torch.Tensor:
    """The z of the numbered sample sheet (sample index i = row i)."""
    return sample_z(g.cfg, n, generator=torch.Generator().manual_seed(seed))


def numbered_sheet(images: torch.Tensor | np.ndarray, nrow: int = 8, min_tile: int = 96, pad: int = 2) -> np.ndarray:
    """A grid with each tile's sample index written in its corner, for picking concepts and drawing boxes.

    Tiles are enlarged (nearest neighbour) to at least `min_tile` pixels so the labels stay legible; box coordinates
    for the forgetting experiment are in the samples' own pixels, not the sheet's.
    """
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    scale = max(1, -(-min_tile // h))
    th, tw = h * scale, w * scale
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    out = np.full((rows * (th + pad) + pad, ncol * (tw + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        tile = cv2.resize(imgs[i], (tw, th), interpolation=cv2.INTER_NEAREST) if scale > 1 else imgs[i].copy()
        label = str(i)
        (lw, lh), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(tile, (0, 0), (lw + 4, lh + base + 3), (0, 0, 0), -1)
        cv2.putText(tile, label, (2, lh + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        out[y : y + th, x : x + tw] = tile
    return out


# ----------------------------------------------------------------------------------------------------------- walks


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` points on the line from z0 to z1, both ends included."""
    t = torch.linspace(0, 1, steps, device=z0.device)[:, None]
    return (1 - t) * z0[None] + t * z1[None]


def latent_walk(g: nn.Module, points: int = 9, steps: int = 8, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(images, nrow): a walk through `points` random z (paper figure 4), one row per leg, `steps` images a row.

    Smooth transitions along every row, with no sharp change, indicate the model has not memorised (section 6.1).
    """
    anchors = sample_z(g.cfg, points, generator=torch.Generator().manual_seed(seed))
    z = torch.cat([interpolate(anchors[i], anchors[i + 1], steps) for i in range(points - 1)])
    return render(g, z), steps


# ------------------------------------------------------------------------------------------------------ arithmetic

_TERM = re.compile(r"^\s*(\d+(?:\s*,\s*\d+)*)\s*$")


def parse_arithmetic(expr: str, n_samples: int) -> list[tuple[int, list[int]]]:
    """'a,b,c - d,e,f + g,h,i' -> [(+1, [a,b,c]), (-1, [d,e,f]), (+1, [g,h,i])], indices checked against the sheet."""
    tokens = re.split(r"([+-])", expr.strip())
    terms: list[tuple[int, list[int]]] = []
    sign = 1
    for tok in tokens:
        if tok in ("+", "-"):
            sign = 1 if tok == "+" else -1
            continue
        if not tok.strip():
            if terms or sign == -1:
                raise InputError(f"arithmetic {expr!r}: an operator without a term")
            continue
        m = _TERM.match(tok)
        if not m:
            raise InputError(f"arithmetic {expr!r}: {tok.strip()!r} is not a comma-separated list of sample indices")
        idx = [int(v) for v in m.group(1).split(",")]
        bad = [i for i in idx if i >= n_samples]
        if bad:
            raise InputError(f"arithmetic {expr!r}: sample indices {bad} are not on the sheet (0..{n_samples - 1})")
        terms.append((sign, idx))
        sign = 1
    if len(terms) < 2:
        raise InputError(f"arithmetic {expr!r}: needs at least two terms, e.g. '1,2,3 - 4,5,6 + 7,8,9'")
    return terms


def vector_arithmetic(g: nn.Module, z_sheet: torch.Tensor, terms: list[tuple[int, list[int]]], noise: float = 0.25,
                      seed: int = 0) -> dict:
    """The paper's figure 7: mean z per concept, signed sum, and a 3x3 grid around the result.

    Returns images of "terms" (one row per concept: its exemplars, then the image of their mean z) and "result"
    (3x3: the result z in the centre, 8 neighbours with uniform noise of +-`noise` added).
    """
    means = [z_sheet[idx].mean(0) for _, idx in terms]
    result = sum(s * m for (s, _), m in zip(terms, means))
    width = max(len(idx) for _, idx in terms) + 1
    rows = []
    for (_, idx), m in zip(terms, means):
        row = [z_sheet[i] for i in idx]
        row += [torch.full_like(m, float("nan"))] * (width - 1 - len(idx)) + [m]
        rows.extend(row)
    zt = torch.stack(rows)
    blank = torch.isnan(zt).any(1)
    timgs = render(g, torch.nan_to_num(zt))
    timgs[blank] = 1.0  # white placeholders where a concept has fewer exemplars
    gen = torch.Generator().manual_seed(seed)
    jitter = (torch.rand(9, result.numel(), generator=gen) * 2 - 1) * noise
    jitter[4] = 0  # the centre is the result itself
    return {"terms": timgs, "terms_nrow": width, "result": render(g, result[None] + jitter), "result_z": result}
