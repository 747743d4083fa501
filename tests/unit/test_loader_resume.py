"""O(1) loader resume (issue 16 item 6): a saved loader position continues the stream exactly, decodes at most
a shard's samples per worker, and under another DP size / worker count deals what was left without loss or repeat.

References that do not share the code under test: the uninterrupted stream (for equality), the sample keys
read from the tars with ``tarfile`` (for the no-loss/no-repeat check), a counting wrapper around the decoder.
"""

import io
import json
import random
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.config import load_config
from megafusion.data.loader_state import DataOrderWarning, pending_epochs
from megafusion.data.stream import LoaderStream

SIZES = [12, 16, 14, 20, 13, 15, 18, 12]  # uneven: worker slots run through epochs at different paces
WORDS = "a red green blue yellow circle square triangle at the top left right bottom center image of".split()
CPU = torch.device("cpu")


def _write_shards(root: Path) -> None:
    """Latent shards in the precompute tool's format: key.npy (float16 [4, 8, 8]), key.txt, key.json."""
    root.mkdir(parents=True)
    rng, words = np.random.default_rng(0), random.Random(0)
    for s, n in enumerate(SIZES):
        with tarfile.open(root / f"latents-{s:06d}.tar", "w") as t:
            for k in range(n):
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((4, 8, 8)).astype(np.float16), allow_pickle=False)
                caption = " ".join(words.choice(WORDS) for _ in range(words.randint(2, 9)))
                for ext, data in (("npy", buf.getvalue()), ("txt", caption.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"s{s}_{k:03d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))


def _dataset_keys(root: Path) -> Counter:
    """The epoch's dataset, read from the tars directly: url#key of every sample."""
    keys = Counter()
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as t:
            keys.update(f"{shard}#{n[:-4]}" for n in t.getnames() if n.endswith(".npy"))
    return keys


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megafusion.demo.tokenizer import write_word_tokenizer

    root = tmp_path_factory.mktemp("resume")
    _write_shards(root / "lat")
    words = random.Random(1)
    (root / "txt").mkdir()
    with tarfile.open(root / "txt" / "text-000000.tar", "w") as t:
        for k in range(30):
            data = " ".join(words.choice(WORDS) for _ in range(words.randint(3, 20))).encode()
            info = tarfile.TarInfo(f"t{k:03d}.txt")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return {"root": root, "tok": write_word_tokenizer(root / "tok"), "keys": _dataset_keys(root / "lat")}


def _cfg(data, workers: int, text: bool = True, **over):
    root = data["root"]
    extra = [f"data.text_path={root}/txt/*.tar", "data.text_ratio=0.3"] if text else []
    return load_config(
        "tiny",
        [
            f"data.path={root}/lat",
            f"data.tokenizer={data['tok']}",
            "data.seq_length=64",
            "data.micro_batch_size=2",
            f"data.num_workers={workers}",
            "data.shuffle_buffer=4",
            "data.caption_first_prob=0.5",
            "diffusion.caption_dropout=0.2",
            *extra,
            *[f"{k.replace('__', '.')}={v}" for k, v in over.items()],
        ],
    )


def _steps(stream: LoaderStream, first: int, last: int, mps: int):
    """Items of steps [first, last) and the JSON state after each step."""
    items, states = [], {}
    for step in range(first, last):
        items += [stream.item(step, m) for m in range(mps)]
        states[step + 1] = json.dumps(stream.state_dict())
    return items, states


def _assert_same(a, b) -> None:
    assert a.batch.sample_keys == b.batch.sample_keys and a.epochs == b.epochs
    for name in ("input_ids", "image_ids", "position_ids", "document_ids", "labels", "loss_mask", "latents"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    assert torch.equal(a.noise, b.noise) and torch.equal(a.batch.timesteps, b.batch.timesteps)


MPS, TOTAL = 2, 40  # micro-batches per step, steps of the reference run (~2.7 epochs)


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def reference(request, data):
    """The uninterrupted stream and its JSON state after each step: the reference of the equality tests."""
    cfg = _cfg(data, request.param)
    items, states = _steps(LoaderStream(cfg, 0, 1, CPU, MPS), 0, TOTAL, MPS)
    return {"cfg": cfg, "workers": request.param, "items": items, "states": states}


def test_resume_equals_the_uninterrupted_stream(reference):
    cfg, ref, states = reference["cfg"], reference["items"], reference["states"]
    parsed = {s: json.loads(v) for s, v in states.items()}
    assert all(json.loads(json.dumps(p)) == p for p in parsed.values())  # plain JSON, round-trips
    # resume points: inside a later shard of epoch 0, after an epoch boundary
    later_shard = next(
        s
        for s, p in parsed.items()
        if all(w["epoch"] == 0 and not w["fresh"] for w in p["workers"]) and any(w["unit"] >= 1 for w in p["workers"])
    )
    past_epoch = next(s for s, p in parsed.items() if s > 20 and min(w["epoch"] for w in p["workers"]) >= 1)
    # and one saved inside a sample's text-only documents: that sample is in hand, not yet packed
    in_hand = next(s for s, p in parsed.items() if any(w["in_hand"] is not None for w in p["workers"]))
    for step in sorted({later_shard, past_epoch, in_hand}):
        stream = LoaderStream(cfg, 0, 1, CPU, MPS)
        assert stream.load_state_dict([json.loads(states[step])], step) is None  # same layout: no warning
        got, after = _steps(stream, step, TOTAL, MPS)
        for a, b in zip(ref[step * MPS :], got, strict=True):
            _assert_same(a, b)
        assert after[TOTAL] == states[TOTAL]  # and it ends in the same position
    if reference["workers"] == 0:  # the old path: a jump without a saved state replays, to the same batches
        stream = LoaderStream(cfg, 0, 1, CPU, MPS)
        for a, b in zip(ref[past_epoch * MPS :], _steps(stream, past_epoch, TOTAL, MPS)[0], strict=True):
            _assert_same(a, b)


class _CountingDecoder:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, parts):
        self.calls += 1
        return self.real(parts)


def test_resume_decodes_at_most_one_shard_per_worker(reference, monkeypatch):
    import megafusion.data.loader as loader

    cfg, ref, step = reference["cfg"], reference["items"], 30  # after 60 micro-batches: well into epoch 1
    saved = json.loads(reference["states"][step])
    assert min(w["epoch"] for w in saved["workers"]) >= 1
    count = _CountingDecoder(loader.read_latent_sample)
    monkeypatch.setattr(loader, "read_latent_sample", count)  # in-process only: num_workers=0
    W = max(1, reference["workers"])

    def first_batches(resume):
        count.calls = 0
        it = iter(loader.make_loader(cfg, 0, 1, start_batch=step * MPS, resume=resume))
        return [next(it) for _ in range(W)], count.calls  # the first batch of each worker

    fast, fast_calls = first_batches(saved["workers"])
    slow, slow_calls = first_batches(None)  # the replay fallback
    for k, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a.sample_keys == b.sample_keys == ref[step * MPS + k].batch.sample_keys
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.latents, b.latents)
    restore = [b.loader_decodes[0] for b in fast]
    replay = [b.loader_decodes[0] for b in slow]
    assert all(r <= max(SIZES) for r in restore), restore  # at most one shard's samples per worker
    assert all(r > 3 * max(SIZES) for r in replay), replay  # replaying decodes every consumed sample
    if W == 1:  # the independent counter agrees: restore + the first batch's own samples
        assert fast_calls <= max(SIZES) and fast_calls == fast[0].loader_decodes[1]
        assert slow_calls > 3 * max(SIZES)


def _run_until_epochs_done(stream: LoaderStream, first: int, mps: int, hi: int, limit: int = 400):
    """Items from ``first`` on until none of this rank's workers holds or will read anything of epochs <= hi."""
    items, step = [], first
    while step < first + limit:
        workers = stream.state_dict()["workers"]
        if all(w["epoch"] > hi and not w["fresh"] and all(e > hi for e in pending_epochs(w)) for w in workers):
            return items
        items += [stream.item(step, m) for m in range(mps)]
        step += 1
    raise AssertionError(f"epochs <= {hi} not done after {limit} steps")


def _keys_by_epoch(items) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for it in items:
        for key, e in zip(it.batch.sample_keys, it.epochs, strict=True):
            out.setdefault(e, Counter())[key] += 1
    return out


@pytest.mark.parametrize("old_dp,old_workers,new_dp,new_workers", [(2, 0, 1, 0), (1, 0, 2, 0), (1, 2, 1, 0)], ids=str)
def test_other_layout_warns_and_loses_or_repeats_nothing(data, old_dp, old_workers, new_dp, new_workers):
    micro_per_step = 4  # micro-batches per optimizer step over all DP ranks
    old_cfg, new_cfg = _cfg(data, old_workers), _cfg(data, new_workers)
    old_mps, new_mps = micro_per_step // old_dp, micro_per_step // new_dp
    streams = [LoaderStream(old_cfg, r, old_dp, CPU, old_mps) for r in range(old_dp)]
    runs = [_steps(s, 0, 24, old_mps) for s in streams]

    def slots_at(step):
        return [w for _, states in runs for w in json.loads(states[step])["workers"]]

    in_epoch0 = [s for s in range(1, 25) if all(w["epoch"] == 0 and not w["fresh"] for w in slots_at(s))]
    # then a save where some slots are an epoch ahead of others; a single old slot cannot be: past epoch 0
    straddle = [s for s in range(1, 25) if len({w["epoch"] for w in slots_at(s)}) > 1]
    later = straddle or [s for s in range(1, 25) if min(w["epoch"] for w in slots_at(s)) >= 1]
    assert bool(straddle) == (old_dp * max(1, old_workers) > 1)
    for step in (in_epoch0[len(in_epoch0) // 2], later[0]):
        saved = [json.loads(states[step]) for _, states in runs]
        before: dict[int, Counter] = {}
        for items, _ in runs:
            for e, c in _keys_by_epoch(items[: step * old_mps]).items():
                before[e] = before.get(e, Counter()) + c
        after: dict[int, Counter] = {}
        hi = max(w["epoch"] for w in slots_at(step))
        for r in range(new_dp):
            stream = LoaderStream(new_cfg, r, new_dp, CPU, new_mps)
            with pytest.warns(DataOrderWarning, match="layout changed"):
                msg = stream.load_state_dict(saved, step)
            assert "each sample once" in msg
            for e, c in _keys_by_epoch(_run_until_epochs_done(stream, step, new_mps, hi)).items():
                after[e] = after.get(e, Counter()) + c
        for e in range(hi + 1):
            assert before.get(e, Counter()) + after.get(e, Counter()) == data["keys"], f"epoch {e} at step {step}"
        assert before.get(hi) and after.get(hi)  # the check spans a save inside epoch hi


def test_state_dict_contents_and_refusals(data):
    cfg = _cfg(data, 0)
    stream = LoaderStream(cfg, 0, 1, CPU, 2)
    _steps(stream, 0, 5, 2)
    sd = stream.state_dict()
    assert json.loads(json.dumps(sd)) == sd
    assert (sd["dp_rank"], sd["dp_size"], sd["num_workers"], sd["consumed"]) == (0, 1, 0, 10)
    assert sd["data_path"] == cfg.data.path and len(json.dumps(sd)) < 20_000  # references, no latents
    with pytest.raises(ValueError, match="another step"):
        LoaderStream(cfg, 0, 1, CPU, 2).load_state_dict([sd], 4)
    with pytest.raises(ValueError, match="needs all 2"):  # another layout needs every rank's state
        LoaderStream(cfg, 0, 1, CPU, 2).load_state_dict([dict(sd, dp_size=2)], 5)
    with pytest.raises(ValueError, match="different saved runs"):
        LoaderStream(cfg, 0, 1, CPU, 2).load_state_dict([sd, dict(sd, dp_rank=1, logical_workers=2)], 5)
    other = dict(sd, shards=len(SIZES) + 1)
    with pytest.raises(ValueError, match="other shards"):
        LoaderStream(cfg, 0, 1, CPU, 2).load_state_dict([other], 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same layout does not warn
        assert LoaderStream(cfg, 0, 1, CPU, 2).load_state_dict([sd], 5) is None
