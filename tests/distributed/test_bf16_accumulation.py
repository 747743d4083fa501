"""bf16 training on CPU (gloo): gradients accumulate over the schedule's micro-batches and reduce over DP in fp32.

The reference does not share the code under test: each micro-batch's bf16 gradient is taken with
``torch.autograd.grad`` (which fires no accumulation hook) on the trainer's own items, summed in fp32
here, and averaged over the DP ranks with a plain fp32 all-reduce.
"""

import math

import pytest
import torch

from tests.helpers import run_distributed

MICRO = 32  # micro-batches per step per rank

BASE = [
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
    "logging.tensorboard=false",
    "checkpoint.interval=100000",
]


def _trainer(run_dir, hf_dir, overrides):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", BASE + list(overrides) + [f"logging.run_dir={run_dir}"])
    init_model_parallel(1, 1)
    return Trainer(cfg, hf_dir, log=lambda s: None)


def _accumulation_worker(rank, world, run_dir, hf_dir, zero, micro):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    overrides = ["parallel.params_dtype=bf16", f"parallel.zero_stage={zero}", f"data.global_batch_size={micro * world}"]
    trainer = _trainer(f"{run_dir}/{rank}", hf_dir, overrides)
    stage = trainer.models[0]
    names = [n for n, p in stage.named_parameters() if p.requires_grad]
    params = [p for p in stage.parameters() if p.requires_grad]
    assert trainer.num_micro == micro and all(p.dtype == torch.bfloat16 for p in params)

    # reference: per-micro-batch bf16 gradients of loss / micro (what the schedule back-propagates)
    fp32_sum = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    bf16_sum = [torch.zeros_like(p) for p in params]  # what autograd's own .grad accumulation would hold
    for m in range(micro):
        item = trainer.stream.item(0, m)
        loss, _ = stage(item.batch, item.noise)
        grads = torch.autograd.grad(loss / micro, params, allow_unused=True)
        for acc, acc16, g in zip(fp32_sum, bf16_sum, grads):
            if g is not None:
                assert g.dtype == torch.bfloat16
                acc.add_(g.float())
                acc16.add_(g)
    reduced = torch.cat([g.reshape(-1) for g in fp32_sum])
    dist.all_reduce(reduced, group=ps.get_data_parallel_group())
    reduced /= world

    # DeepSpeed's buffers: the accumulation before the DP reduction, the fp32 partition after it
    from deepspeed.utils import safe_get_full_grad

    from megafusion.parallel.grads import accumulated_grad

    captured = {}
    allreduce = trainer.engine.allreduce_gradients

    def capture(*args, **kwargs):  # (ZeRO-2 has reduced into its fp32 partition during backward already)
        captured["accum"] = [accumulated_grad(p).clone() for p in params] if zero == 1 else fp32_sum
        out = allreduce(*args, **kwargs)
        captured["reduced"] = [safe_get_full_grad(p).clone() for p in params]
        return out

    trainer.engine.allreduce_gradients = capture
    text_before = {n: p.detach().clone() for n, p in stage.named_parameters() if not p.requires_grad}
    trainer.train_step()
    text_same = all(torch.equal(text_before[n], p) for n, p in stage.named_parameters() if not p.requires_grad)
    from megafusion.training.engine import optimizer_state_bytes

    n_trainable = sum(p.numel() for p in params)
    return {
        "accum": torch.cat([g.reshape(-1).float() for g in captured["accum"]]),
        "accum_dtypes": torch.tensor([g.dtype == torch.float32 for g in captured["accum"]]),
        "ref": torch.cat([g.reshape(-1) for g in fp32_sum]),
        "ref16": torch.cat([g.reshape(-1).float() for g in bf16_sum]),
        "deepspeed_reduced": torch.cat([g.reshape(-1).float() for g in captured["reduced"]]),
        "ref_reduced": reduced,
        "text_same": torch.tensor(text_same),
        "optimizer_bytes_per_param": torch.tensor(optimizer_state_bytes(trainer.optimizer) * world / n_trainable),
        "names": len(names),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("zero,micro", [(1, MICRO), (2, 1)], ids=["zero1-32-micro", "zero2-1-micro"])
def test_bf16_gradients_accumulate_and_reduce_in_fp32(tmp_path, tiny_hf_for_preset, zero, micro):
    """ZeRO-1: 32 micro-batches accumulate in fp32, then reduce over DP=2 in fp32. ZeRO-2 (one micro-batch
    per step, validation's rule): its backward-hook reduction runs in fp32 into an fp32 partition."""
    args = (str(tmp_path / "run"), tiny_hf_for_preset, zero, micro)
    results = run_distributed(_accumulation_worker, 2, *args, timeout=600)
    for r in results:
        ref, accum = r["ref"], r["accum"]
        scale = ref.abs().max()
        # the same bf16 micro-batch gradients summed in the same order in fp32: equal to fp32 rounding
        err = (accum - ref).abs().max() / scale
        assert err <= 1e-6, err
        assert bool(r["accum_dtypes"].all())
        if micro > 1:  # mutation check: the sum autograd's bf16 .grad would hold is far off by the same measure
            err16 = (r["ref16"] - ref).abs().max() / scale
            assert err16 > 1e-3, err16
        # the DP mean of the fp32 sums (DeepSpeed pre-divides: fp32 rounding apart)
        red = r["ref_reduced"]
        err_red = (r["deepspeed_reduced"] - red).abs().max() / red.abs().max()
        assert err_red <= 1e-6, err_red
        assert bool(r["text_same"])
        # fp32 master + two Adam moments per trainable parameter, partitioned over DP (gradients are not counted)
        assert float(r["optimizer_bytes_per_param"]) == pytest.approx(12.0, rel=1e-3)


def _track_worker(rank, world, run_dir, hf_dir, dtype, steps):
    trainer = _trainer(run_dir, hf_dir, [f"parallel.params_dtype={dtype}", "data.global_batch_size=4"])
    history = trainer.run(steps)
    return {"loss": torch.tensor([h.loss for h in history], dtype=torch.float64)}


@pytest.mark.distributed
def test_50_bf16_steps_track_fp32(tmp_path, tiny_hf_for_preset):
    """The bf16 path (bf16 weights and activations, fp32 accumulation, fp32 master) follows the fp32 run.

    Tolerance: each step's loss within 1% of the fp32 run's and the mean of the last 10 within 0.5%
    (measured on this preset: 0.04% and 0.003%). This checks the bf16 run trains like the fp32 one over
    many updates; the exactness of the fp32 accumulation is the test above.
    """
    steps = 50
    f32 = run_distributed(_track_worker, 1, str(tmp_path / "fp32"), tiny_hf_for_preset, "fp32", steps)[0]["loss"]
    b16 = run_distributed(_track_worker, 1, str(tmp_path / "bf16"), tiny_hf_for_preset, "bf16", steps)[0]["loss"]
    assert all(math.isfinite(x) for x in b16.tolist())
    rel = ((b16 - f32).abs() / f32).max()
    assert rel < 0.01, (rel, f32[-5:], b16[-5:])
    assert abs(b16[-10:].mean() - f32[-10:].mean()) / f32[-10:].mean() < 0.005
    assert f32[-10:].mean() < f32[:5].mean() and b16[-10:].mean() < b16[:5].mean()  # both actually learned


@pytest.fixture(scope="module")
def tiny_hf_for_preset(tmp_path_factory):
    """A random HF Llama with the tiny preset's dimensions."""
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    return str(write_random_hf_llama(load_config("tiny").model, tmp_path_factory.mktemp("bf16") / "hf", seed=0))
