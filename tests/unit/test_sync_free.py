"""A sync-free training forward (issue 17 item 6): with the routing plan the loader ships in the batch, one
micro-batch's forward and backward run no op that reads a device value back to the host.

The reference that does not share the code under test is PyTorch's own op stream: a ``TorchDispatchMode``
sees every aten op the forward and backward dispatch and raises on the ones that make the host wait for
the device on a GPU (``nonzero``, ``item`` / ``_local_scalar_dense``, ``equal``, boolean-mask indexing, ...;
on the CPU they cost nothing, so only the op stream can tell). Each test first checks that the mode does
raise on the same batch without its plan (today's code path), so a mode that sees nothing cannot pass.
"""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megafusion.config import load_config
from megafusion.model.routing import RoutePlan
from tests.helpers import run_distributed

aten = torch.ops.aten
CPU = torch.device("cpu")

# ops whose result size or value the host must read from the device (a cudaStreamSynchronize on a GPU)
READBACK = {
    aten.nonzero,
    aten._local_scalar_dense,
    aten.item,
    aten.equal,
    aten.is_nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
    aten.unique_dim,
}


class DeviceReadback(RuntimeError):
    """An op that would sync the device with the host ran inside :class:`NoDeviceReadback`."""


def _bool_index(indices) -> bool:
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


def _is_masked_fill(self: torch.Tensor, indices, value: torch.Tensor, accumulate: bool = False) -> bool:
    """``x[mask] = scalar``: ATen's index_put_ runs it as ``masked_fill_`` (``canDispatchToMaskedFill``: one
    bool mask on x's device, a one-element CPU value, no accumulate), which needs no nonzero and so no sync.
    megatron-core's ``vocab_parallel_cross_entropy`` writes its out-of-shard targets that way."""
    masks = [t for t in indices if t is not None]
    return (
        not accumulate
        and value.numel() == 1
        and value.device.type == "cpu"
        and len(masks) == 1
        and masks[0].dtype in (torch.bool, torch.uint8)
        and masks[0].device == self.device
    )


class NoDeviceReadback(TorchDispatchMode):
    """Raise on every aten op that reads a device value back to the host; record the others' names."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        bad = (
            packet in READBACK
            or torch.Tag.data_dependent_output in func.tags
            or (packet is aten.index and _bool_index(args[1]))
            or (packet in (aten.index_put, aten.index_put_) and _bool_index(args[1]) and not _is_masked_fill(*args))
            or (packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 3)
        )
        if bad:
            raise DeviceReadback(f"{func} reads a device value back to the host")
        return func(*args, **kwargs)


def _step(stage, batch, noise) -> torch.Tensor:
    """One micro-batch forward + backward the way megatron-core's schedule runs it; returns the loss."""
    stage.zero_grad(set_to_none=True)
    loss, _ = stage(batch, noise)
    loss.backward()
    return loss.detach()


def _grads(stage) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}


def _assert_sync_free_and_identical(stage, batch, noise) -> None:
    """Without the plan the mode raises (today's path); with it the step is sync-free; both give the same
    loss and gradients bit for bit."""
    assert batch.route_plan is not None
    bare = replace(batch, route_plan=None)
    with pytest.raises(DeviceReadback, match="nonzero"), NoDeviceReadback():
        stage(bare, noise)
    ref_loss = _step(stage, bare, noise)
    ref_grads = _grads(stage)
    with NoDeviceReadback():
        loss = _step(stage, batch, noise)
    assert torch.equal(loss, ref_loss)
    grads = _grads(stage)
    assert grads.keys() == ref_grads.keys() and "core.layers.0.qkv.image.weight" in grads
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


# ------------------------------------------------------------------ one rank, tiny preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel
    from megafusion.training.stages import build_stage_models

    cfg = load_config("tiny", ["data.seq_length=64"])
    hf = write_random_hf_llama(cfg.model, tmp_path_factory.mktemp("sync_free") / "hf", seed=3)
    init_model_parallel(1, 1)
    stage = build_stage_models(cfg, str(hf), ParallelContext.current())[0]
    return cfg, stage


def test_synthetic_training_step_is_sync_free(tiny):
    from megafusion.data.stream import SyntheticStream

    cfg, stage = tiny
    item = SyntheticStream(cfg, 0, CPU, 2).item(0, 1)
    assert item.batch.num_images >= 2 and item.batch.route_plan.full.num_text > 0
    _assert_sync_free_and_identical(stage, item.batch, item.noise)


def _write_shards(root: Path, sizes: tuple[int, ...] = (6, 5)) -> None:
    """Latent shards in the precompute tool's format: key.npy (float16 [4, 8, 8]), key.txt, key.json."""
    root.mkdir(parents=True)
    rng, words = np.random.default_rng(0), random.Random(0)
    vocab = "a red green blue circle square at the top left image of".split()
    for s, n in enumerate(sizes):
        with tarfile.open(root / f"latents-{s:06d}.tar", "w") as t:
            for k in range(n):
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((4, 8, 8)).astype(np.float16), allow_pickle=False)
                caption = " ".join(words.choice(vocab) for _ in range(words.randint(2, 9)))
                for ext, data in (("npy", buf.getvalue()), ("txt", caption.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"s{s}_{k:03d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def loader_cfg(tiny, tmp_path_factory):
    from megafusion.demo.tokenizer import write_word_tokenizer

    root = tmp_path_factory.mktemp("sync_free_data")
    _write_shards(root / "lat")
    tok = write_word_tokenizer(root / "tok")

    def make(workers: int):
        return load_config(
            "tiny",
            [
                f"data.path={root}/lat",
                f"data.tokenizer={tok}",
                "data.seq_length=64",
                "data.micro_batch_size=2",
                f"data.num_workers={workers}",
                "data.shuffle_buffer=2",
                "data.caption_first_prob=0.5",
            ],
        )

    return make


def test_loader_batches_carry_the_plan_and_train_sync_free(tiny, loader_cfg):
    """The packing code of the loader workers ships the plan (also through a worker process's pickling),
    and the model's routes from it equal the routes it builds itself."""
    from megafusion.data.stream import LoaderStream

    _, stage = tiny
    items = [LoaderStream(loader_cfg(0), 0, 1, CPU, 1).item(0, 0)]
    items.append(LoaderStream(loader_cfg(1), 0, 1, CPU, 1).item(0, 0))  # via a spawned DataLoader worker
    for item in items:
        plan = item.batch.route_plan
        assert isinstance(plan, RoutePlan) and plan.batch_shape == tuple(item.batch.input_ids.shape)
        assert plan.full.num_image == item.batch.num_images * 16 and isinstance(plan.full.num_text, int)
        core = stage.core
        shipped = core.prepare(item.batch).inputs.routes
        built = core.prepare(replace(item.batch, route_plan=None)).inputs.routes
        assert shipped.full.same_as(built.full) and shipped.local.same_as(built.local)
    assert torch.equal(items[0].batch.input_ids, items[1].batch.input_ids)
    assert items[0].batch.route_plan.same_as(items[1].batch.route_plan)
    _assert_sync_free_and_identical(stage, items[0].batch, items[0].noise)


def test_plan_shards_equal_the_models_narrowed_routes():
    """The sequence-parallel shards a plan ships are the routes the model narrows itself at every TP rank;
    a plan for another TP size falls back to narrowing; a stale plan is refused by ``check``."""
    from megafusion.model.batch import FusionBatch
    from tests.helpers import TINY_IMAGE, mixed_batch

    batch = mixed_batch(300)  # 2 rows x 64, three images, one row with two documents
    b, s = batch.image_ids.shape
    is_image = (batch.image_ids >= 0).t().reshape(-1)  # [s*b]
    own = RoutePlan.build(batch.image_ids)
    for tp in (2, 4):
        plan = RoutePlan.build(batch.image_ids, tp)
        assert len(plan.shards) == tp and plan.full.same_as(own.full)
        for r in range(tp):
            want = own.routes(True, tp, r, is_image).local
            assert plan.shards[r].same_as(want)
            assert plan.routes(True, tp, r, is_image).local is plan.shards[r]
            assert RoutePlan.build(batch.image_ids, 2).routes(True, tp, r, is_image).local.same_as(want)
    assert sum(sh.num_image for sh in RoutePlan.build(batch.image_ids, 4).shards) == own.full.num_image
    text_only = RoutePlan.build(torch.full((b, s), -1))
    assert text_only.full.perm is None and text_only.full.num_image == 0
    img = TINY_IMAGE
    shape = (img.latent_channels, img.latent_size, img.latent_size)
    replace(batch, route_plan=own).check(img.tokens_per_image, shape)
    stale = replace(batch, route_plan=RoutePlan.build(mixed_batch(300, b=2, s=64).image_ids.roll(3, 1)))
    with pytest.raises(ValueError, match="route_plan"):
        stale.check(img.tokens_per_image, shape)
    moved = FusionBatch.text_only(batch.input_ids)
    moved.route_plan = own
    assert moved.to("cpu").route_plan.full.perm.device.type == "cpu"


# ------------------------------------------------------------------ TP=2 with sequence parallelism


def _sp_worker(rank, world, hf_dir):
    from megafusion.data.stream import SyntheticStream
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel
    from megafusion.training.stages import build_stage_models

    cfg = load_config("tiny", ["data.seq_length=64", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"])
    init_model_parallel(2, 1)
    pctx = ParallelContext.current(sequence_parallel=True)
    assert pctx.sequence_parallel
    stage = build_stage_models(cfg, hf_dir, pctx)[0]
    item = SyntheticStream(cfg, 0, CPU, 1).item(0, 0)
    assert len(item.batch.route_plan.shards) == 2
    _assert_sync_free_and_identical(stage, item.batch, item.noise)
    loss, _ = stage(item.batch, item.noise)
    return {"loss": loss.detach()}


@pytest.mark.distributed
def test_sequence_parallel_training_step_is_sync_free(tmp_path):
    from megafusion.demo.tiny_llama import write_random_hf_llama

    hf = write_random_hf_llama(load_config("tiny").model, tmp_path / "hf", seed=3)
    out = run_distributed(_sp_worker, 2, str(hf))
    assert torch.equal(out[0]["loss"], out[1]["loss"])
