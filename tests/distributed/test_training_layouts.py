"""Training across layouts: PP=2, interleaved PP, TP=2 x PP=2 and ZeRO DP=2 against references.

Each run trains the tiny model a few steps through the real Trainer (megatron-core
schedules + DeepSpeed) in spawned gloo ranks; full weights are reassembled from
every rank and compared with a TP=1 x PP=1 run, or with plain torch AdamW.
"""

import pytest
import torch

from tests.helpers import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 3
BASE = [
    "optim.eps=1e-4",
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_size=4",
    "optim.warmup_steps=2",
    "optim.lr=2e-3",
    "checkpoint.interval=1000",
    "logging.tensorboard=false",
]


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    from megafusion.checkpoint.gather import gather_full

    out = {}
    for stage in trainer.models:
        for name, t in gather_full(stage.core).items():
            out[name] = t
    return out


def _train_worker(rank, world, overrides, hf_dir, run_dir):
    from megafusion.config import load_config, validate_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = validate_config(load_config("tiny", BASE + overrides + [f"logging.run_dir={run_dir}"]), world_size=world)
    init_model_parallel(
        cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline_stages
    )
    trainer = Trainer(cfg, hf_dir, log=lambda s: None)
    initial = _full_weights(trainer)
    history = trainer.run(STEPS)
    from megafusion.training.engine import optimizer_state_bytes

    inner = trainer.optimizer.optimizer
    moments = sum(
        v.numel() * v.element_size()
        for st in inner.state.values()
        for k, v in st.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    return {
        "losses": torch.tensor([h.loss for h in history], dtype=torch.float64),
        "grad_norms": torch.tensor([h.grad_norm for h in history], dtype=torch.float64),
        "initial": initial,
        "final": _full_weights(trainer),
        "moment_bytes": torch.tensor(moments),
        "state_bytes": torch.tensor(optimizer_state_bytes(trainer.optimizer)),
        "trainable_numel": torch.tensor(sum(p.numel() for p in trainer.trainable_parameters())),
    }


def _merge(results):
    merged = {}
    for r in results:
        merged.update(r["final"])
    return merged


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    return str(write_random_hf_llama(load_config("tiny").model, tmp_path_factory.mktemp("base") / "llama", seed=3))


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    return run_distributed(_train_worker, 1, [], tiny_base, str(tmp_path_factory.mktemp("ref")))[0]


@pytest.mark.parametrize(
    "world,overrides",
    [
        (2, ["parallel.pipeline_parallel=2"]),
        (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2"]),
        (
            4,
            [
                "parallel.pipeline_parallel=2",
                "parallel.tensor_parallel=2",
                "parallel.sequence_parallel=true",
                "parallel.activation_checkpointing=true",
            ],
        ),
    ],
    ids=["pp2", "pp2_vpp2", "tp2_pp2_sp_ckpt"],
)
def test_layout_matches_single_rank(tiny_base, reference, tmp_path, world, overrides):
    results = run_distributed(_train_worker, world, overrides, tiny_base, str(tmp_path))
    last = results[-1]  # the last pipeline stage reports the losses; all ranks agree after reduction
    torch.testing.assert_close(last["losses"], reference["losses"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last["grad_norms"], reference["grad_norms"], atol=1e-4, rtol=1e-4)
    final = _merge(results)
    assert set(final) == set(reference["final"])
    for name, ref in reference["final"].items():
        torch.testing.assert_close(final[name], ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_text_tower_frozen_image_side_learns(reference):
    from megafusion.model.llamafusion import is_text_tower_param

    init, final = reference["initial"], reference["final"]
    text = [n for n in init if is_text_tower_param(n)]
    image = [n for n in init if not is_text_tower_param(n)]
    assert text and image
    for n in text:
        assert torch.equal(init[n], final[n]), f"text-tower weight {n} changed"
    changed = [n for n in image if not torch.equal(init[n], final[n])]
    assert "layers.0.qkv.image.weight" in changed and "image_in.conv_in.weight" in changed
    assert len(changed) >= len(image) - 1  # every image-side weight except possibly unused <EOI> rows


def _reference_adamw(hf_dir, overrides, dp, steps):
    """Plain torch: same model, same micro-batches of every DP rank, mean loss, clip 1.0, AdamW."""
    from megafusion.config import load_config
    from megafusion.data.stream import SyntheticStream
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel
    from megafusion.training.engine import param_groups
    from megafusion.training.lr_schedule import learning_rate
    from megafusion.training.stages import build_stage_models

    cfg = load_config("tiny", BASE + overrides)
    init_model_parallel(1, 1)
    stage = build_stage_models(cfg, hf_dir, ParallelContext.current())[0]
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(stage, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    streams = [SyntheticStream(cfg, r, torch.device("cpu"), n_micro) for r in range(dp)]
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(o, step)
        opt.zero_grad()
        total = 0.0
        for r in range(dp):
            for m in range(n_micro):
                item = streams[r].item(step, m)
                loss, _ = stage(item.batch, item.noise)
                (loss / (n_micro * dp)).backward()
                total += loss.item() / (n_micro * dp)
        torch.nn.utils.clip_grad_norm_([p for p in stage.parameters() if p.requires_grad], o.clip_grad)
        opt.step()
        losses.append(total)
    from megafusion.checkpoint.gather import gather_full

    return torch.tensor(losses, dtype=torch.float64), gather_full(stage.core)


def _reference_worker(rank, world, hf_dir, overrides, dp, steps):
    losses, final = _reference_adamw(hf_dir, overrides, dp, steps)
    return {"losses": losses, "final": final}


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.zero_stage=1"],  # 2 micro-batches per rank accumulated by megatron-core's schedule
        ["parallel.zero_stage=2", "data.global_batch_size=2"],  # stage 2: one micro-batch per step
    ],
    ids=["zero1", "zero2"],
)
def test_zero_dp2_matches_torch_adamw(tiny_base, tmp_path, overrides):
    results = run_distributed(_train_worker, 2, overrides, tiny_base, str(tmp_path))
    ref = run_distributed(_reference_worker, 1, tiny_base, overrides, 2, STEPS)[0]
    for r in results:
        torch.testing.assert_close(r["losses"], ref["losses"], atol=1e-5, rtol=1e-5)
    for name, want in ref["final"].items():
        torch.testing.assert_close(
            results[0]["final"][name], want, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
        assert torch.equal(results[0]["final"][name], results[1]["final"][name]), f"DP replicas differ: {name}"
    # optimizer state: Adam moments of exactly half the trainable params per rank, so none for frozen weights
    n = results[0]["trainable_numel"].item()
    for r in results:
        per_rank_moments = r["moment_bytes"].item()
        assert abs(per_rank_moments - 2 * 4 * n / 2) <= 2 * 4 * 2 * 64, (per_rank_moments, n)


@pytest.fixture(scope="module")
def transfusion_reference(tiny_base, tmp_path_factory):
    return run_distributed(
        _train_worker, 1, ["model.architecture=transfusion"], tiny_base, str(tmp_path_factory.mktemp("tf_ref"))
    )[0]


@pytest.mark.parametrize("overrides", [[], ["parallel.sequence_parallel=true"]], ids=["tp2", "tp2_sp"])
def test_transfusion_baseline_tp2_matches_single_rank(tiny_base, transfusion_reference, tmp_path, overrides):
    """The one-tower baseline trains its text tower too (embedding, final norm, LM head under TP)."""
    ref = transfusion_reference
    results = run_distributed(
        _train_worker,
        2,
        ["model.architecture=transfusion", "parallel.tensor_parallel=2", *overrides],
        tiny_base,
        str(tmp_path),
    )
    torch.testing.assert_close(results[0]["losses"], ref["losses"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0]["grad_norms"], ref["grad_norms"], atol=1e-4, rtol=1e-4)
    final = _merge(results)
    assert set(final) == set(ref["final"])
    for name, want in ref["final"].items():
        torch.testing.assert_close(final[name], want, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    for name in (
        "embedding.weight",
        "layers.0.qkv.text.weight",
        "layers.1.down.text.weight",
        "layers.0.gate_up.norm.text",
        "final_norm.weight",
        "lm_head.weight",
    ):
        assert not torch.equal(ref["initial"][name], ref["final"][name]), f"{name} did not train"
    # its TP=2 checkpoint holds the trained text tower and loads at TP=1 (vocab shards re-padded) for inference
    from megafusion.api import load_for_inference
    from megafusion.checkpoint.gather import gather_full

    loaded = gather_full(load_for_inference(tmp_path / "checkpoints").model)
    assert set(loaded) == set(final)
    for name, want in final.items():
        torch.testing.assert_close(loaded[name], want, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
