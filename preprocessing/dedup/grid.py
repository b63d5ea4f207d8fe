"""The fixed order of the views a multi-view hash cuts from each image (layer: preprocessing; no project imports,
so that the configuration can name how many there are without importing the hashing)."""

from __future__ import annotations

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
