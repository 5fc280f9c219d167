"""Vectors of texts the server embeds again and again (a pack's tool cards, the sentences
of the knowledge a desk is asked about): each text is embedded once, the ones not yet
known in one batch, and the least recently used are dropped past `size`."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np


class TextVectors:
    def __init__(self, size: int):
        self.size = size
        self._known: OrderedDict[str, np.ndarray] = OrderedDict()

    async def get(self, embedder: Any, texts: list[str]) -> dict[str, np.ndarray]:
        """Each text's normalised vector; `embedder` embeds those not known yet."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._known]
        if missing:
            self._known.update(zip(missing, await embedder.embed(missing), strict=True))
        for t in texts:
            self._known.move_to_end(t)
        found = {t: self._known[t] for t in texts}
        while len(self._known) > self.size:
            self._known.popitem(last=False)
        return found
