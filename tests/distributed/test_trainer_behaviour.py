"""Trainer behaviour on one spawned rank: learning on a repeated batch, skipping non-finite steps."""

import math

import pytest
import torch

from tests.helpers import run_distributed

BASE = [
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_size=2",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "logging.tensorboard=false",
    "checkpoint.interval=1",
    "optim.max_consecutive_nonfinite=2",
]


def _trainer(run_dir, hf_dir, overrides=()):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    cfg = load_config("tiny", BASE + list(overrides) + [f"logging.run_dir={run_dir}"])
    init_model_parallel(1, 1)
    return Trainer(cfg, hf_dir, log=lambda s: None)


def _repeated_batch_worker(rank, world, run_dir, hf_dir):
    trainer = _trainer(run_dir, hf_dir)
    fixed = trainer.stream.item
    trainer.stream.item = lambda step, micro: fixed(0, micro)  # the same batch every step
    history = trainer.run(10)
    return {"losses": torch.tensor([h.loss for h in history])}


def _nonfinite_worker(rank, world, run_dir, hf_dir, overrides):
    from megafusion.checkpoint.files import latest_checkpoint
    from megafusion.training.trainer import NonFiniteError

    trainer = _trainer(run_dir, hf_dir, overrides)
    trainer.run(2)  # two good steps, checkpoints at 1 and 2
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    good = trainer.stream.item

    def poisoned(step, micro):
        item = good(step, micro)
        item.batch.latents[0, 0, 0, 0] = float("nan")
        return item

    trainer.stream.item = poisoned
    raised = ""
    try:
        trainer.run(10)
    except NonFiniteError as exc:
        raised = str(exc)
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad)
    from safetensors.torch import load_file

    latest = latest_checkpoint(trainer.save_dir)  # holds good weights: step 2, or a skipped step after it
    saved = load_file(str(latest / "model" / "tp0_pp0.safetensors"))
    ckpt_good = all(torch.equal(saved[n], before[n]) for n in before)
    latest_step = int(latest.name.split("_")[1])
    # after the skipped steps, good data trains normally again (DeepSpeed's buffers were cleared)
    trainer.stream.item = good
    trainer.nonfinite_run = 0
    after = trainer.run(trainer.step + 2)
    recovered = all(math.isfinite(h.loss) and math.isfinite(h.grad_norm) for h in after[-2:])
    changed = any(not torch.equal(before[n], p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad)
    return {
        "ckpt_good": torch.tensor(ckpt_good),
        "recovered": torch.tensor(recovered and changed),
        "raised": torch.tensor(len(raised) > 0 and "optim.max_consecutive_nonfinite=2" in raised),
        "skipped": torch.tensor(trainer.skipped),
        "unchanged": torch.tensor(unchanged),
        "latest_step": torch.tensor(latest_step),
    }


def _corruption_worker(rank, world, run_dir, hf_dir):
    from megafusion.checkpoint.files import CheckpointError, latest_checkpoint
    from megafusion.checkpoint.training_state import load_checkpoint

    trainer = _trainer(run_dir, hf_dir)
    trainer.run(1)
    ckpt = latest_checkpoint(trainer.save_dir)
    messages = []
    model_file = ckpt / "model" / "tp0_pp0.safetensors"
    optim_file = ckpt / "optim" / "tp0_pp0_dp0.safetensors"
    original = model_file.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01  # one bit inside the tensor data
    model_file.write_bytes(bytes(flipped))
    try:
        load_checkpoint(ckpt, trainer.engine.module, trainer.optimizer)
    except CheckpointError as exc:
        messages.append(str(exc))
    model_file.write_bytes(original)
    optim_file.write_bytes(optim_file.read_bytes()[:-100])  # truncated
    try:
        load_checkpoint(ckpt, trainer.engine.module, trainer.optimizer)
    except CheckpointError as exc:
        messages.append(str(exc))
    return {"msgs": messages}


def test_truncated_or_flipped_shards_are_named(base, tmp_path):
    msgs = run_distributed(_corruption_worker, 1, str(tmp_path), base)[0]["msgs"]
    assert len(msgs) == 2
    assert "model/tp0_pp0.safetensors" in msgs[0] and "corrupted" in msgs[0]
    assert "optim/tp0_pp0_dp0.safetensors" in msgs[1] and "truncated" in msgs[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    return str(write_random_hf_llama(load_config("tiny").model, tmp_path_factory.mktemp("b") / "llama", seed=7))


def test_loss_goes_down_on_a_repeated_batch(base, tmp_path):
    losses = run_distributed(_repeated_batch_worker, 1, str(tmp_path), base)[0]["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "overrides", [[], ["parallel.zero_stage=2", "data.global_batch_size=1"]], ids=["zero1", "zero2"]
)
def test_nonfinite_steps_are_skipped_then_stop(base, tmp_path, overrides):
    r = run_distributed(_nonfinite_worker, 1, str(tmp_path), base, overrides)[0]
    assert r["raised"].item()
    assert r["skipped"].item() == 2
    assert r["unchanged"].item()  # skipped steps never touched the weights
    # `latest` holds good weights: the poisoned steps never reached a checkpoint (step 2, or step 3 = skipped)
    assert r["latest_step"].item() >= 2 and r["ckpt_good"].item()
    assert r["recovered"].item()


def _shared_verification_worker(rank, world, run_dir, hf_dir):
    from megafusion.checkpoint import files
    from megafusion.checkpoint.files import CheckpointError, latest_checkpoint
    from megafusion.checkpoint.training_state import load_checkpoint

    trainer = _trainer(run_dir, hf_dir)  # DP=2: both ranks read model/tp0_pp0.safetensors
    trainer.run(1)
    ckpt = latest_checkpoint(trainer.save_dir)
    hashed: list[str] = []
    real = files._file_checksum

    def counting(path, algo):
        hashed.append(str(path.relative_to(ckpt)))
        return real(path, algo)

    files._file_checksum = counting
    load_checkpoint(ckpt, trainer.engine.module, trainer.optimizer)
    first = list(hashed)
    # a flipped bit in the shared model shard: every rank raises the same error (none hangs)
    import torch.distributed as dist

    model_file = ckpt / "model" / "tp0_pp0.safetensors"
    dist.barrier()
    if rank == 0:
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        model_file.write_bytes(bytes(data))
    dist.barrier()
    msg = ""
    try:
        load_checkpoint(ckpt, trainer.engine.module, trainer.optimizer)
    except CheckpointError as exc:
        msg = str(exc)
    return {"hashed": first, "msg": msg}


def test_shared_shard_is_verified_by_one_rank(base, tmp_path):
    res = run_distributed(_shared_verification_worker, 2, str(tmp_path), base)
    model = "model/tp0_pp0.safetensors"
    assert sum(r["hashed"].count(model) for r in res) == 1, [r["hashed"] for r in res]
    for r, dp in zip(res, (0, 1)):  # each rank still checks its own partition and RNG state
        assert f"optim/tp0_pp0_dp{dp}.safetensors" in r["hashed"] and f"rng/rank{dp}.safetensors" in r["hashed"]
    assert all(model in r["msg"] and "corrupted" in r["msg"] for r in res), [r["msg"] for r in res]


def _text_only_rank_worker(rank, world, run_dir, hf_dir, zero):
    """Micro-batch 1 of every step (DP rank 1's only one at DP=2) is text-only: it reaches no U-Net."""
    from megafusion.data.stream import TrainItem
    from megafusion.model.batch import FusionBatch

    trainer = _trainer(
        run_dir,
        hf_dir,
        [f"parallel.zero_stage={zero}", "optim.eps=1e-4", "checkpoint.interval=1000", "data.global_batch_size=2"],
    )
    good = trainer.stream.item

    def item(step, micro):
        if trainer.dp_rank * trainer.num_micro + micro != 1:
            return good(step, micro)
        ids = torch.randint(0, 500, (1, 64), generator=torch.Generator().manual_seed(step))
        batch = FusionBatch.text_only(ids, labels=torch.roll(ids, -1, 1))
        batch.loss_mask = torch.ones(1, 64)
        return TrainItem(batch.with_defaults(), torch.zeros(0))

    trainer.stream.item = item
    history = trainer.run(2)
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    return {"losses": torch.tensor([h.loss for h in history]), "weights": weights}


@pytest.mark.parametrize("zero", [1, 2])
def test_text_only_rank_issues_the_same_collectives(base, tmp_path, zero):
    """DP=2 where one rank's micro-batch holds no image completes (before: DeepSpeed skipped the U-Net
    parameters on that rank only and the ranks' collectives mismatched) and matches one rank running
    the same two micro-batches. ZeRO-1 reduces after the schedule (zeros filled in for the missing
    gradients); ZeRO-2 reduces in backward hooks, which fire on the text-only rank too because the
    image side runs on empty slices there (``Routes.with_full_graph``)."""
    ref = run_distributed(_text_only_rank_worker, 1, str(tmp_path / "ref"), base, 1)[0]
    got = run_distributed(_text_only_rank_worker, 2, str(tmp_path / "dp2"), base, zero, timeout=180)
    torch.testing.assert_close(got[0]["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got[0]["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[1]["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)


def _replica_worker(rank, world, run_dir, hf_dir, perturb, zero=1, dp=1):
    from megafusion.config import load_config
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.trainer import Trainer

    tp = world // dp
    extra = ["parallel.zero_stage=2", f"data.global_batch_size={dp}"] if zero == 2 else []  # ZeRO-2: 1 micro-batch
    cfg = load_config(
        "tiny",
        BASE + [f"logging.run_dir={run_dir}", f"parallel.tensor_parallel={tp}", "checkpoint.interval=1000"] + extra,
    )
    init_model_parallel(tp, 1)
    trainer = Trainer(cfg, hf_dir, log=lambda s: None)
    core = trainer.models[0].core
    name, target = next((n, p) for n, p in core.named_parameters() if n.startswith("image_in.") and p.requires_grad)
    if perturb and rank == 1:  # what a non-deterministic kernel does: a slightly different gradient on one rank
        # (rank 1 is TP rank 1 of DP rank 0: megatron's TP groups are consecutive ranks)
        target.register_hook(lambda g: g + 1e-3 * torch.randn_like(g))
    history = trainer.run(2)
    return {
        "w": target.detach().clone(),
        "special": core.special_embedding.detach().clone(),
        "name": name,
        "grad_norms": torch.tensor([h.grad_norm for h in history], dtype=torch.float64),
    }


@pytest.mark.parametrize("zero", [1, 2])
def test_tp_replicated_parameters_stay_equal_and_count_once(base, tmp_path, zero):
    """TP=2: a U-Net gradient perturbed on one rank only still leaves both ranks' replicas equal (ZeRO-1: their
    grads are averaged over TP; ZeRO-2, whose hooks reduce them in backward: rank 0's weights are broadcast
    after the step); without perturbation the grad norm equals the TP=1 run's (replicas counted once).
    (At this size ZeRO-2 keeps the grads in one bucket until the step, so the averaging alone already
    holds; the broadcast is what holds when earlier buckets are reduced and freed inside backward.)"""
    got = run_distributed(_replica_worker, 2, str(tmp_path / "p"), base, True, zero)
    assert torch.equal(got[0]["w"], got[1]["w"]), got[0]["name"]
    assert torch.equal(got[0]["special"], got[1]["special"])
    ref = run_distributed(_replica_worker, 1, str(tmp_path / "r"), base, False, zero)[0]
    tp2 = run_distributed(_replica_worker, 2, str(tmp_path / "t"), base, False, zero)
    torch.testing.assert_close(tp2[0]["grad_norms"], ref["grad_norms"], rtol=1e-5, atol=1e-6)
