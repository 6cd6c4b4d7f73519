"""Contact sheet for the demo: a grid of labelled overlays in one PNG.

Kept apart from :mod:`camserve.pipeline.render` (request-path encoders) because only ``make demo``
and the client CLI draw sheets.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from camserve.errors import InputError
from camserve.pipeline.render import check_image, encode_png


def contact_sheet(tiles: Sequence[np.ndarray], labels: Sequence[str], *, columns: int = 4,
                  tile_size: int = 160, pad: int = 6) -> np.ndarray:
    """A grid of labelled RGB tiles (e.g. overlays), uint8 RGB; encode it with ``encode_png``.

    Each tile is resized to ``tile_size`` x ``tile_size`` and gets its label in a strip
    above it (text shortened to fit). Rows are filled left to right.
    """
    if len(tiles) == 0 or len(tiles) != len(labels):
        raise InputError(f"contact sheet needs one label per tile and at least one tile, got {len(tiles)} tiles "
                         f"and {len(labels)} labels")
    if columns < 1 or tile_size < 16:
        raise InputError(f"contact sheet needs columns >= 1 and tile_size >= 16, got {columns}, {tile_size}")
    strip = 18
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    cell_w, cell_h = tile_size + pad, tile_size + strip + pad
    sheet = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        tile = check_image(tile, f"tile {i}")
        r, c = divmod(i, cols)
        y, x = pad + r * cell_h, pad + c * cell_w
        sheet[y + strip : y + strip + tile_size, x : x + tile_size] = cv2.resize(
            tile, (tile_size, tile_size), interpolation=cv2.INTER_AREA)
        text = str(label)
        while len(text) > 1 and cv2.getTextSize(text, font, scale, 1)[0][0] > tile_size:
            text = text[:-2] + "."
        cv2.putText(sheet, text, (x + 1, y + strip - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def contact_sheet_png(tiles: Sequence[np.ndarray], labels: Sequence[str], **kwargs: int) -> bytes:
    """:func:`contact_sheet` encoded as PNG bytes."""
    return encode_png(contact_sheet(tiles, labels, **kwargs))
