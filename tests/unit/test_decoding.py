"""Decoding: the preallocated KV cache, EOS checked without a host sync per token, flex compiles per bucket."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megafusion.inference.generate import EOS_CHECK_EVERY
from megafusion.model.batch import FusionBatch
from megafusion.model.kv_cache import KVCache
from tests.helpers import TINY_IMAGE, make_tiny_hf_llama

BOI, EOI, BOS = 297, 298, 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from megafusion import LlamaFusion

    hf = make_tiny_hf_llama(tmp_path_factory.mktemp("dec") / "hf", seed=3)
    return LlamaFusion.from_hf_llama(str(hf), image=TINY_IMAGE, boi_token_id=BOI, eoi_token_id=EOI).eval()


def _prompts(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 290, (b, s), generator=torch.Generator().manual_seed(seed))


def _step(tok: torch.Tensor, pos: int) -> FusionBatch:
    """One decoded token per row [b] at position ``pos`` -> a 1-token text batch."""
    b = tok.shape[0]
    return FusionBatch(
        input_ids=tok[:, None],
        image_ids=torch.full((b, 1), -1),
        position_ids=torch.full((b, 1), pos),
        document_ids=torch.zeros(b, 1, dtype=torch.long),
    )


class _CountSyncs(TorchDispatchMode):
    """Counts device -> host scalar reads (``.item()``, ``bool(t)``, ``int(t)``): the syncs of a CUDA run."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------- (1) correctness
@torch.no_grad()
def test_cached_greedy_equals_full_recomputation(model):
    """generate_text (preallocated cache) and a hand loop on an exactly sized cache give, token for token,
    what re-running the whole sequence through text_logits gives."""
    ids, n = _prompts(3, 7), 20
    seq = ids.clone()
    for _ in range(n):  # no cache at all: the full sequence every token
        seq = torch.cat([seq, model.text_logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate_text(ids, max_new_tokens=n), seq)

    cache = KVCache(3, max_len=7 + n - 1)  # exactly: the last new token is never fed back
    logits, _ = model.forward_cached(FusionBatch.text_only(ids), cache)
    toks = []
    for i in range(n):
        toks.append(logits.argmax(-1))
        if i < n - 1:
            logits, _ = model.forward_cached(_step(toks[-1], 7 + i), cache)
    assert torch.equal(torch.stack(toks, 1), seq[:, 7:]) and cache.length == 7 + n - 1


# ---------------------------------------------------------------------------------------- (2) no reallocation
@torch.no_grad()
def test_cache_is_written_in_place_and_refuses_to_overflow(model):
    b, s, n = 2, 6, 5
    cache = KVCache(b, max_len=s + n + 1)
    ids = _prompts(b, s, seed=1)
    logits, _ = model.forward_cached(FusionBatch.text_only(ids), cache)
    layers = list(model.layers.values())
    ptrs = {lyr.layer_id: [t.data_ptr() for t in cache.buffers(lyr.layer_id)] for lyr in layers}
    k0 = layers[0].layer_id
    assert cache.buffers(k0)[0].shape[2] == s + n + 1  # allocated once, at max_len
    toks = [ids]
    for i in range(n):
        tok = logits.argmax(-1)
        toks.append(tok[:, None])
        logits, _ = model.forward_cached(_step(tok, s + i), cache)
        assert cache.length == s + i + 1
        assert {lid: [t.data_ptr() for t in cache.buffers(lid)] for lid in ptrs} == ptrs  # same storage
    # the stored prefix is what one prefill of the whole sequence stores
    ref = KVCache(b)
    model.forward_cached(FusionBatch.text_only(torch.cat(toks, 1)), ref)
    for lid in ptrs:
        for got, want in zip(cache.layer(lid), ref.layer(lid)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a frozen forward attends to the prefix (its scratch needs room too) but leaves it as it was
    before = [t.clone() for t in cache.layer(k0)]
    cache.frozen = True
    frozen_logits, _ = model.forward_cached(_step(logits.argmax(-1), s + n), cache)
    cache.frozen = False
    assert cache.length == s + n and all(torch.equal(a, c) for a, c in zip(before, cache.layer(k0)))
    appended, _ = model.forward_cached(_step(logits.argmax(-1), s + n), cache)  # the last free position
    assert torch.equal(frozen_logits, appended) and cache.length == s + n + 1
    with pytest.raises(ValueError, match=r"KV cache full: 1 new tokens after 12 cached exceed its max_len=12"):
        model.forward_cached(_step(logits.argmax(-1), s + n + 1), cache)


def test_unsized_cache_grows_geometrically():
    """Without max_len the buffers double when outgrown: O(log n) reallocations, not one per token."""
    cache = KVCache(1)
    ptrs = set()
    for i in range(64):
        k = torch.full((1, 2, 1, 4), float(i))
        keys, _ = cache.extend(0, k, k)
        cache.commit(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), -1))
        ptrs.add(cache.buffers(0)[0].data_ptr())
        assert keys.shape == (1, 2, i + 1, 4)
    assert len(ptrs) <= 8
    assert torch.equal(cache.layer(0)[0][0, 0, :, 0], torch.arange(64.0))


# ---------------------------------------------------------------------------------------- (3) EOS
def _expected_with_eos(free: torch.Tensor, eos: int) -> torch.Tensor:
    """Per-token EOS semantics applied to tokens decoded without EOS [b, n]: pad each row with EOS after its
    first EOS, stop after the column where the last row finished."""
    out = free.clone()
    for row in out:
        hit = (row == eos).nonzero()
        if len(hit):
            row[int(hit[0]) :] = eos
    all_eos = (out == eos).all(0).nonzero()
    return out[:, : int(all_eos[0]) + 1] if len(all_eos) else out


@torch.no_grad()
def test_eos_gives_per_token_results_with_bounded_host_syncs(model):
    ids, n = _prompts(2, 5, seed=2), 64
    free = model.generate_text(ids, max_new_tokens=n)[:, 5:]  # no EOS: all 64 tokens
    # one row finishes early, the other never: full length, the early row padded with EOS
    eos = int(free[0, 3])
    assert eos not in free[1].tolist()
    with _CountSyncs() as syncs:
        got = model.generate_text(ids, max_new_tokens=n, eos_token_id=eos)
    assert torch.equal(got[:, 5:], _expected_with_eos(free, eos))
    old_per_token_checks = n
    assert syncs.n <= math.ceil(n / EOS_CHECK_EVERY) + 3 < old_per_token_checks, syncs.n
    # every row finishes (at different steps): cut after the last one, not at the next check
    firsts = {t: max(r.tolist().index(t) for r in free) for t in set(free[0].tolist()) & set(free[1].tolist())}
    eos = min(firsts, key=firsts.get)
    assert firsts[eos] % EOS_CHECK_EVERY != EOS_CHECK_EVERY - 1  # the cut is not at a check
    want = _expected_with_eos(free, eos)
    assert want.shape[1] == firsts[eos] + 1 < n
    for every in (1, 5, EOS_CHECK_EVERY, 1000):
        assert torch.equal(model.generate_text(ids, n, eos_token_id=eos, eos_check_every=every)[:, 5:], want)


@torch.no_grad()
def test_caption_with_eos_stops_at_eos(model):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    free = model.caption(latents, bos_token_id=BOS, max_new_tokens=12)
    eos = free[0][2]
    caps = model.caption(latents, bos_token_id=BOS, max_new_tokens=12, eos_token_id=eos)
    assert caps == [r[: r.index(eos)] if eos in r else r for r in free]


# ---------------------------------------------------------------------------------------- (4) flex compiles
@torch.no_grad()
def test_flex_text_logits_over_ten_lengths_compiles_at_most_twice(model, monkeypatch):
    """The compile site as on CUDA (static shapes), with Dynamo's eager backend so CPU can run it."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    import megafusion.model.attention_core as core

    lengths = list(range(5, 55, 5))
    ref = [model.text_logits(_prompts(2, s, seed=s)) for s in lengths]  # sdpa
    monkeypatch.setattr(model.cfg, "attention_backend", "flex")
    monkeypatch.setattr(core, "_compiled_flex", torch.compile(flex_attention, dynamic=False, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    try:
        got = [model.text_logits(_prompts(2, s, seed=s)) for s in lengths]
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert 1 <= graphs <= 2, dict(counters["stats"])
    for a, b in zip(got, ref):  # the padding is masked out
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_bucket_is_a_power_of_two_of_at_least_one_block():
    from megafusion.model.attention_core import flex_bucket

    assert [flex_bucket(s) for s in (1, 5, 127, 128, 129, 256, 1000, 4096)] == [
        128,
        128,
        128,
        128,
        256,
        256,
        1024,
        4096,
    ]
