"""Keys and values of the tokens a sequence has seen so far, per layer, for cached decoding.

Each layer's keys/values live in one preallocated buffer ``[b, hkv_local, max_len, d]``
(after RoPE; this TP rank's KV heads only, so a cache lives beside its model shard and
needs no communication). A forward writes its new tokens in place at the current
position and attends to a view of the filled prefix ``[b, hkv_local, s_past + s, d]``.
Growing the cache with ``torch.cat`` instead copied the whole past of every layer at
every decoded token (quadratic traffic in the generated length, and one fresh
allocation per layer per token); in place, a decoded token costs one write of ``s``
columns. Beside them, in buffers of the same length: the past tokens' document and
image ids, from which the attention mask of new queries against the past is rebuilt
(``hybrid_attention_mask`` with a query offset).

``max_len`` (prompt + new tokens + image tokens: the callers in ``megafusion.inference``
know it) fixes the capacity, and a forward past it raises. Without it the buffers are
sized by the first forward and double when outgrown (amortised O(1) per token), for
callers that cannot say how long the sequence gets.

Two ways a forward uses the cache (``frozen``):
  * appending (prompt prefill, each decoded token): new keys/values are stored and
    :meth:`commit` advances the length;
  * frozen (each denoising step of an image): new tokens are written past the stored
    prefix as scratch that the length does not cover, so every step starts from the
    same prefix (the next step or the next appending forward overwrites them).
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer key/value buffers plus the document/image ids of the cached tokens."""

    def __init__(self, batch_size: int, max_len: int | None = None, frozen: bool = False) -> None:
        if max_len is not None and max_len < 1:
            raise ValueError(f"KVCache max_len must be >= 1, got {max_len}")
        self.batch_size = batch_size  # rows of the sequences it holds (checked against each new batch)
        self.max_len = max_len  # fixed capacity in tokens; None: sized by the first forward, doubling
        self.frozen = frozen  # True: forwards attend to the prefix but do not store (denoising steps)
        self._keys: dict[int, torch.Tensor] = {}  # layer -> [b, hkv, capacity, d]
        self._values: dict[int, torch.Tensor] = {}
        self._ids: torch.Tensor | None = None  # [2, b, capacity]: document ids, image ids (-1 text)
        self._length = 0  # tokens stored (committed); positions past it are scratch

    # ------------------------------------------------------------------ what is stored
    @property
    def length(self) -> int:
        """Tokens stored so far: the query offset of the next forward."""
        return self._length

    @property
    def document_ids(self) -> torch.Tensor | None:
        """[b, s_past] document ids of the stored tokens (None while empty)."""
        return None if self._ids is None or not self._length else self._ids[0, :, : self._length]

    @property
    def image_ids(self) -> torch.Tensor | None:
        """[b, s_past] image ids of the stored tokens, -1 for text (None while empty)."""
        return None if self._ids is None or not self._length else self._ids[1, :, : self._length]

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys/values of one layer, views [b, hkv, s_past, d] of its buffers."""
        return self._keys[layer_id][:, :, : self._length], self._values[layer_id][:, :, : self._length]

    def buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole preallocated buffers [b, hkv, capacity, d] of one layer (for tests and benchmarks)."""
        return self._keys[layer_id], self._values[layer_id]

    # ------------------------------------------------------------------ capacity
    def _capacity_for(self, end: int, have: int) -> int:
        """Capacity a buffer holding ``have`` positions needs so that ``end`` positions fit."""
        if self.max_len is not None:
            if end > self.max_len:
                raise ValueError(
                    f"KV cache full: {end - self._length} new tokens after {self._length} cached exceed "
                    f"its max_len={self.max_len}; create KVCache(batch_size, max_len=...) with room for "
                    "the prompt, every new token and every image's tokens"
                )
            return self.max_len
        return max(end, 2 * have)

    def _room(self, buf: torch.Tensor | None, end: int, like: torch.Tensor, dim: int) -> torch.Tensor:
        """``buf`` if ``end`` positions along ``dim`` fit, else a larger buffer holding its stored prefix."""
        have = 0 if buf is None else buf.shape[dim]
        if end <= have:
            return buf
        shape = list(like.shape)
        shape[dim] = self._capacity_for(end, have)
        new = like.new_empty(shape)
        if buf is not None and self._length:
            new.narrow(dim, 0, self._length).copy_(buf.narrow(dim, 0, self._length))
        return new

    # ------------------------------------------------------------------ one forward
    def extend(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New k/v [b, hkv, s, d] -> past + new [b, hkv, s_past + s, d] (views of the buffers).

        The new columns are written at the current length in place; only :meth:`commit`
        (not frozen) makes them part of the stored prefix.
        """
        if k.shape[0] != self.batch_size:
            raise ValueError(f"a KV cache of {self.batch_size} rows was given keys of {k.shape[0]} rows")
        start, end = self._length, self._length + k.shape[2]
        kb, vb = self._keys.get(layer_id), self._values.get(layer_id)
        if kb is not None and (kb.shape[1] != k.shape[1] or kb.shape[3] != k.shape[3] or kb.dtype != k.dtype):
            raise ValueError(
                f"layer {layer_id}: keys [*, {k.shape[1]}, *, {k.shape[3]}] {k.dtype} do not match the "
                f"cached [*, {kb.shape[1]}, *, {kb.shape[3]}] {kb.dtype}"
            )
        kb = self._keys[layer_id] = self._room(kb, end, k, dim=2)  # [b, hkv, capacity, d]
        vb = self._values[layer_id] = self._room(vb, end, v, dim=2)
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def key_ids(self, document_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Document/image ids of every key a forward of these new tokens attends to: [b, s_past + s]."""
        if document_ids.shape[0] != self.batch_size:
            raise ValueError(f"a KV cache of {self.batch_size} rows was given a batch of {document_ids.shape[0]}")
        start, end = self._length, self._length + document_ids.shape[1]
        like = document_ids.new_empty(2, self.batch_size, 1)  # shape/dtype/device of the id buffer
        self._ids = self._room(self._ids, end, like, dim=2)  # [2, b, capacity]
        self._ids[0, :, start:end] = document_ids
        self._ids[1, :, start:end] = image_ids
        return self._ids[0, :, :end], self._ids[1, :, :end]

    def commit(self, document_ids: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Make the tokens whose keys/values an appending forward just wrote part of the stored prefix."""
        if not self.frozen:
            self.key_ids(document_ids, image_ids)  # (re)writes their ids: commit is valid on its own too
            self._length += document_ids.shape[1]
