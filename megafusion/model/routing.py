"""Modality routing: which rows of a token tensor go to the text tower and which to the image tower.

A :class:`Route` is built once per forward from the per-token modality and is
shared by every routed norm and projection of every layer. ``split`` performs
one gather that groups the rows by modality (text rows, then image rows) and
returns two views; ``merge`` performs one concatenation plus one gather that
puts rows back in sequence order. Each tower then runs one matmul over exactly
its own tokens, so routing costs two memory passes, not a second tower's FLOPs.

When a sequence holds only one modality (e.g. text-only inference) split and
merge are free: no copy, no index, the single tower sees the tensor as is, which
keeps text-only outputs bit-identical to the base Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Parts = tuple[torch.Tensor | None, torch.Tensor | None]
TEXT, IMAGE = 0, 1


@dataclass
class Route:
    """Row routing for a flattened token tensor of ``num_tokens`` rows.

    ``perm`` lists text rows then image rows; ``inv_perm`` is its inverse.
    Image rows appear in ``perm`` in the order given at construction, which lets
    callers read image tokens out in image order (see ``from_modality``).
    """

    num_tokens: int
    num_text: int
    num_image: int
    perm: torch.Tensor | None  # [N] long; None when only one modality is present
    inv_perm: torch.Tensor | None

    @staticmethod
    def from_modality(is_image: torch.Tensor, image_rows: torch.Tensor | None = None) -> Route:
        """Build from a bool vector [N] (True = image token).

        ``image_rows`` optionally gives the image rows in a chosen order (a
        permutation of ``nonzero(is_image)``); by default they are ascending.
        """
        is_image = is_image.reshape(-1)
        n = is_image.numel()
        text_rows = torch.nonzero(~is_image, as_tuple=False).squeeze(1)
        if image_rows is None:
            image_rows = torch.nonzero(is_image, as_tuple=False).squeeze(1)
        n_text, n_image = text_rows.numel(), image_rows.numel()
        if n_text + n_image != n:
            raise ValueError(f"image_rows has {n_image} rows but is_image marks {n - n_text}")
        if n_image == 0:
            return Route(n, n_text, n_image, None, None)
        if n_text == 0 and torch.equal(image_rows, torch.arange(n, device=image_rows.device)):
            return Route(n, n_text, n_image, None, None)  # all image tokens, already in image order
        perm = torch.cat([text_rows, image_rows])
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(n, device=perm.device)
        return Route(n, n_text, n_image, perm, inv_perm)

    @staticmethod
    def all_text(num_tokens: int) -> Route:
        return Route(num_tokens, num_tokens, 0, None, None)

    def narrow(self, start: int, length: int, is_image: torch.Tensor) -> Route:
        """Route of the contiguous row block [start, start+length) (a sequence-parallel shard)."""
        if self.num_image == 0:
            return Route.all_text(length)
        if self.num_text == 0:
            return Route(length, 0, length, None, None)
        return Route.from_modality(is_image.reshape(-1)[start : start + length])

    def split(self, x: torch.Tensor) -> Parts:
        """x [N, ...] -> (text rows [Nt, ...] or None, image rows [Ni, ...] or None)."""
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"route expects {self.num_tokens} rows, got tensor of shape {tuple(x.shape)}")
        if self.perm is None:
            return (x, None) if self.num_image == 0 else (None, x)
        grouped = x.index_select(0, self.perm)  # [N, ...] text rows then image rows
        return grouped[: self.num_text], grouped[self.num_text :]

    def merge(self, parts: Parts) -> torch.Tensor:
        """Inverse of :meth:`split`: rows back in sequence order [N, ...]."""
        text, image = parts
        if self.perm is None:
            out = text if self.num_image == 0 else image
            assert out is not None
            return out
        return torch.cat([text, image], 0).index_select(0, self.inv_perm)


@dataclass
class Routes:
    """The routes one forward needs.

    ``full`` covers every token of the micro-batch ([s*b] rows, sequence-major);
    ``local`` covers the rows this rank holds in the residual stream: the same
    as ``full`` without sequence parallelism, this rank's sequence shard with it.
    """

    full: Route
    local: Route
