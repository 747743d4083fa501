"""parallel.device / parallel.params_dtype / parallel.backend: resolution, validation before spawn, and the
bf16 path on CPU taking inputs of every kind (CPU int32/int64 ids, fp32 latents) through every public entry."""

import subprocess
import sys
import warnings

import pytest
import torch

from megafusion.parallel.placement import (
    PlacementError,
    cuda_index,
    resolve_backend,
    resolve_device,
    resolve_params_dtype,
    resolve_placement,
)
from tests.helpers import TINY_IMAGE, make_tiny_hf_llama, mixed_batch

BOI, EOI = 298, 299


def test_auto_resolves_to_what_the_machine_has_and_names_are_checked():
    cpu = torch.device("cpu")
    p = resolve_placement("cpu", "auto", "auto")
    assert (p.device, p.params_dtype, p.backend) == (cpu, torch.float32, "gloo")
    for name in ("bf16", "bfloat16"):
        assert resolve_params_dtype(name, cpu) is torch.bfloat16
    for name in ("fp32", "float32"):
        assert resolve_params_dtype(name, torch.device("cuda", 0)) is torch.float32
    assert resolve_params_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(PlacementError, match="parallel.backend=nccl needs CUDA"):
        resolve_backend("nccl", cpu)
    with pytest.raises(PlacementError, match="parallel.params_dtype='half'"):
        resolve_params_dtype("half", cpu)
    with pytest.raises(PlacementError, match="parallel.device='gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PlacementError, match="parallel.device=cuda but torch sees no CUDA device"):
        resolve_device("cuda")


def test_one_visible_gpu_is_device_0_and_local_rank_beyond_the_gpus_is_refused(monkeypatch):
    """The index rule alone (the CUDA calls it makes are the device count): one visible device per task
    (SLURM --gpus-per-task=1, or several ranks on a one-GPU machine) is device 0 whatever LOCAL_RANK says."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cuda_index(3) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert cuda_index() == 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(PlacementError, match=r"LOCAL_RANK=5 but this process sees 2 CUDA devices.*=4,5"):
        cuda_index()


def test_config_validation_names_the_bad_placement_keys_before_spawn():
    from megafusion.config import ConfigError, load_config, validate_config

    cfg = validate_config(load_config("tiny", ["parallel.params_dtype=bf16", "parallel.backend=gloo"]), 1)
    assert cfg.parallel.params_dtype == "bf16"
    for override, msg in (
        ("parallel.params_dtype=half", "parallel.params_dtype='half'"),
        ("parallel.device=gpu", "parallel.device='gpu'"),
        ("parallel.backend=mpi", "parallel.backend='mpi'"),
    ):
        with pytest.raises(ConfigError, match=msg):
            validate_config(load_config("tiny", [override]), 1)
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA tensors, but parallel.device=cpu"):
        validate_config(load_config("tiny", ["parallel.device=cpu", "parallel.backend=nccl"]), 1)
    # the launcher refuses it before any process group: exit code 2, one line naming the key
    r = subprocess.run(
        [sys.executable, "-m", "launcher.train", "--check", "--config", "tiny", "parallel.device=tpu"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "parallel.device='tpu'" in r.stderr, r.stderr


def test_an_old_config_with_model_params_dtype_still_loads(tmp_path):
    """Checkpoints written before parallel.params_dtype existed carry model.params_dtype in config.yaml."""
    from megafusion.config import load_config

    old = tmp_path / "config.yaml"
    old.write_text("base: tiny\nmodel:\n  params_dtype: bfloat16\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(str(old))
    assert cfg.parallel.params_dtype == "bfloat16"
    assert any("model.params_dtype is now parallel.params_dtype" in str(w.message) for w in caught)


# ---------------------------------------------------------------------- the bf16 model on CPU


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("place") / "hf", seed=5)


@pytest.fixture(scope="module")
def models(hf_dir):
    """The same LlamaFusion in fp32 and in bf16, in one process (the dtype is per model, the device per process)."""
    from megafusion import LlamaFusion

    kw = dict(image=TINY_IMAGE, boi_token_id=BOI, eoi_token_id=EOI)
    fp32 = LlamaFusion.from_hf_llama(str(hf_dir), params_dtype="fp32", **kw).eval()
    bf16 = LlamaFusion.from_hf_llama(str(hf_dir), params_dtype="bf16", **kw).eval()
    return fp32, bf16


def test_params_dtype_reaches_every_parameter_and_megatron(models):
    fp32, bf16 = models
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.config.params_dtype is torch.bfloat16 and bf16.config.bf16
    assert bf16.device == torch.device("cpu") and all(p.device.type == "cpu" for p in bf16.parameters())


def test_text_logits_and_forward_take_user_inputs_and_track_fp32(models):
    fp32, bf16 = models
    ids32 = torch.randint(3, 290, (2, 12), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    ref = fp32.text_logits(ids32.long())
    got = bf16.text_logits(ids32)  # int32 ids, CPU
    assert got.dtype is torch.bfloat16 and got.shape == ref.shape
    # bf16 weights and activations over 2 layers: logits within a few bf16 ulps of the fp32 model's
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.03, err
    assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9

    batch = mixed_batch(300, seed=1)  # fp32 latents, int64 ids, fp32 loss mask
    with torch.no_grad():
        out32, out16 = fp32(batch), bf16(batch)
    assert out16.image_pred.dtype is torch.bfloat16
    assert abs(float(out16.lm_loss) - float(out32.lm_loss)) < 0.02 * float(out32.lm_loss)
    rel = (out16.image_pred.float() - out32.image_pred).norm() / out32.image_pred.norm()
    assert rel < 0.05, rel


def test_generation_entry_points_take_cpu_fp32_inputs_in_bf16(models):
    _, bf16 = models
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 290, (2, 6), generator=g, dtype=torch.int32)
    out = bf16.generate_text(ids, max_new_tokens=4)
    assert out.shape == (2, 10) and torch.equal(out[:, :6].cpu(), ids.long())
    lat = bf16.generate_images([[1, 5, 7], [1, 9]], num_steps=2, generator=torch.Generator().manual_seed(0))
    ls = TINY_IMAGE.latent_size
    assert lat.shape == (2, TINY_IMAGE.latent_channels, ls, ls) and torch.isfinite(lat.float()).all()
    clean = torch.randn(2, TINY_IMAGE.latent_channels, ls, ls, generator=g)  # fp32, as a VAE gives them
    caps = bf16.caption(clean, bos_token_id=1, max_new_tokens=3)
    assert len(caps) == 2 and all(len(c) == 3 for c in caps)
    seq, images = bf16.generate_interleaved(
        [1, 5, BOI], max_new_tokens=3, num_steps=2, generator=torch.Generator().manual_seed(1)
    )
    assert len(images) == 1 and images[0].shape[-1] == ls


def test_perplexity_in_bf16_matches_fp32(models):
    from megafusion.demo.base_lm import sequence_perplexity

    class Tok:  # ids straight from the characters: enough for the helper's contract
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 280) for c in text]}

    fp32, bf16 = models
    texts = ["a red circle at the top", "two blue squares"]
    p32 = sequence_perplexity(fp32.text_logits, Tok(), texts)
    p16 = sequence_perplexity(bf16.text_logits, Tok(), texts)
    assert abs(p16 - p32) < 0.02 * p32, (p16, p32)
