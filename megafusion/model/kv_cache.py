"""Keys and values of the tokens a sequence has seen so far, per layer, for cached decoding.

Each layer's entry is ``[b, hkv_local, s_past, d]`` after RoPE (this TP rank's KV
heads only, so a cache lives beside its model shard and needs no communication).
Beside them: the past tokens' document and image ids, from which the attention
mask of new queries against the past is rebuilt (``hybrid_attention_mask`` with a
query offset).

Two ways a forward uses the cache (``frozen``):
  * appending (prompt prefill, each decoded token): new keys/values are stored;
  * frozen (each denoising step of an image): new tokens attend to the cached
    prefix but are not stored, so every step starts from the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    batch_size: int  # rows of the sequences it holds (checked against each new batch)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    document_ids: torch.Tensor | None = None  # [b, s_past]
    image_ids: torch.Tensor | None = None  # [b, s_past], -1 for text
    frozen: bool = False  # True: extend() does not store (denoising steps)

    @property
    def length(self) -> int:
        return 0 if self.document_ids is None else self.document_ids.shape[1]

    def extend(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New k/v [b, hkv, s, d] -> past + new [b, hkv, s_past + s, d]; stored unless frozen."""
        if layer_id in self.keys:
            k = torch.cat([self.keys[layer_id], k], dim=2)
            v = torch.cat([self.values[layer_id], v], dim=2)
        if not self.frozen:
            self.keys[layer_id], self.values[layer_id] = k, v
        return k, v

    def key_ids(self, document_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Document/image ids of every key a forward of these new tokens attends to: [b, s_past + s]."""
        if document_ids.shape[0] != self.batch_size:
            raise ValueError(f"a KV cache of {self.batch_size} rows was given a batch of {document_ids.shape[0]}")
        if self.document_ids is None:
            return document_ids, image_ids
        return torch.cat([self.document_ids, document_ids], 1), torch.cat([self.image_ids, image_ids], 1)

    def commit(self, document_ids: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Record the ids of tokens whose keys/values an appending forward just stored."""
        if not self.frozen:
            self.document_ids, self.image_ids = self.key_ids(document_ids, image_ids)
