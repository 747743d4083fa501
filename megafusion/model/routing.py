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

Building a route reads data-dependent sizes (how many rows are text) back to the
host: on a GPU that is a device-to-host sync per forward, and it rules out CUDA
graphs. Training batches therefore carry a :class:`RoutePlan`, the routes built
on the CPU where the batch is packed (data-loader workers, the synthetic
stream), with counts as Python ints and index tensors that move to the device
with the batch. The model builds the plan itself, with the syncs, only for
batches that come without one (inference, user batches). Both come out of
:meth:`RoutePlan.build`, so the two paths give the same integer indices and
bit-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    full_graph: bool = False
    """Text-only: still hand the image tower an empty [0, ...] slice and merge its (empty) output back, so the
    image-side weights are in the backward graph with zero gradients (:meth:`Routes.with_full_graph`)."""

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

    def to(self, device: torch.device | str) -> Route:
        """The same route with its index tensors on ``device`` (counts stay host ints: no sync to read them)."""
        if self.perm is None:
            return self
        return Route(self.num_tokens, self.num_text, self.num_image, self.perm.to(device), self.inv_perm.to(device))

    def same_as(self, other: Route) -> bool:
        """Equal counts and equal indices (a check that reads indices back: validation only, not per forward)."""
        if (self.num_tokens, self.num_text, self.num_image) != (other.num_tokens, other.num_text, other.num_image):
            return False
        if (self.perm is None) != (other.perm is None):
            return False
        return self.perm is None or torch.equal(self.perm.cpu(), other.perm.cpu())

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
            if self.num_image == 0:
                return x, (x[:0] if self.full_graph else None)
            return None, x
        grouped = x.index_select(0, self.perm)  # [N, ...] text rows then image rows
        return grouped[: self.num_text], grouped[self.num_text :]

    def merge(self, parts: Parts) -> torch.Tensor:
        """Inverse of :meth:`split`: rows back in sequence order [N, ...]."""
        text, image = parts
        if self.perm is None:
            out = text if self.num_image == 0 else image
            assert out is not None
            if self.full_graph and self.num_image == 0 and image is not None:
                return torch.cat([out, image], 0)  # + [0, ...]: same values, the image tower stays in the graph
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

    def with_full_graph(self) -> Routes:
        """Routes whose text-only splits keep an empty image part (``Route.full_graph``).

        DeepSpeed ZeRO-2 reduces each gradient in a hook that fires when its parameter's
        gradient is made. A micro-batch without images would make none for the image tower and
        U-Nets, so that DP rank would issue other (and differently ordered) reductions than its
        peers: a hang under NCCL. With an empty slice through the same modules, every trainable
        parameter gets a (zero) gradient in the same place of every backward, at no FLOP cost.
        """
        return Routes(replace(self.full, full_graph=True), replace(self.local, full_graph=True))


@dataclass
class RoutePlan:
    """The routes of one micro-batch, computed once from its ``image_ids`` (see the module docstring).

    ``shards`` holds the local route of every sequence-parallel shard when the plan was
    built for ``sp_shards`` > 1 (the loader knows the TP size of the run; every TP rank
    reads the same batch and picks its own); empty otherwise. ``batch_shape`` is the
    ``(b, s)`` of the ``image_ids`` it was built from, checked by the model for free.
    """

    full: Route
    shards: tuple[Route, ...]
    batch_shape: tuple[int, int]

    @staticmethod
    def build(image_ids: torch.Tensor, sp_shards: int = 1) -> RoutePlan:
        """Plan of a [b, s] ``image_ids`` (-1 = text), on its device; ``sp_shards`` sequence-parallel shards.

        Rows are the sequence-major [s*b] layout of the residual stream; the image rows are
        listed in image order (row by row, then position), the order of ``latents``, so the
        image tokens a split returns reshape to [n_img, T, h]. Reads sizes back to the host.
        """
        b, s = image_ids.shape
        is_image_bs = image_ids >= 0  # [b, s]
        bi, si = torch.nonzero(is_image_bs, as_tuple=True)  # row-major = image order
        image_rows = si * b + bi  # rows of the sequence-major [s*b] layout, in image order
        is_image = is_image_bs.t().reshape(-1)  # [s*b]
        full = Route.from_modality(is_image, image_rows)
        shards: tuple[Route, ...] = ()
        if sp_shards > 1:
            if (s * b) % sp_shards:
                raise ValueError(f"{s * b} tokens do not split into {sp_shards} sequence-parallel shards")
            n_local = s * b // sp_shards
            shards = tuple(full.narrow(r * n_local, n_local, is_image) for r in range(sp_shards))
        return RoutePlan(full, shards, (b, s))

    def to(self, device: torch.device | str) -> RoutePlan:
        return RoutePlan(self.full.to(device), tuple(r.to(device) for r in self.shards), self.batch_shape)

    def routes(self, sequence_parallel: bool, tp_size: int, tp_rank: int, is_image: torch.Tensor) -> Routes:
        """The :class:`Routes` of TP rank ``tp_rank``; ``is_image`` [s*b] (sequence-major) is read only when
        the plan holds no shards for this TP size, to narrow the full route here (with a sync)."""
        if not sequence_parallel:
            return Routes(self.full, self.full)
        if len(self.shards) == tp_size:
            return Routes(self.full, self.shards[tp_rank])
        n_local = self.full.num_tokens // tp_size
        return Routes(self.full, self.full.narrow(tp_rank * n_local, n_local, is_image))

    def same_as(self, other: RoutePlan) -> bool:
        """Same shape, routes and shards (validation: reads indices back)."""
        return (
            self.batch_shape == other.batch_shape
            and len(self.shards) == len(other.shards)
            and self.full.same_as(other.full)
            and all(a.same_as(b) for a, b in zip(self.shards, other.shards))
        )
