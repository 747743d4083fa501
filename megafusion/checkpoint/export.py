"""megafusion training checkpoint -> a Hugging Face directory plus the image side.

The output directory is what ``transformers.LlamaForCausalLM.from_pretrained``
loads (the text tower: the base Llama's files, copied bit for bit, since the
text tower never trains; from a LLaVA base, ``LlavaForConditionalGeneration`` with
its processor files) and, beside it, ``megafusion_image.safetensors`` (image
tower, U-Nets, <BOI>/<EOI> rows, in full, layout-independent form) and
``megafusion_config.json`` (the model config), which
``LlamaFusion.from_pretrained(DIR)`` loads back at any TP size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from megafusion.checkpoint.build import M, build_llamafusion
from megafusion.checkpoint.files import CheckpointError, frozen_source_fingerprint, read_checkpoint_files, verify_file
from megafusion.checkpoint.gather import canonical_name, shard, shard_kind, unshard
from megafusion.checkpoint.shapes import dim_conflicts, index_shape_problems
from megafusion.checkpoint.source import CheckpointSource
from megafusion.checkpoint.tensor_file import TensorFile, write_tensor_file
from megafusion.config.loader import config_from_dict
from megafusion.config.schema import Config
from megafusion.durable import publish
from megafusion.model.llamafusion import LlamaFusionModel
from megafusion.parallel.process_groups import ParallelContext

IMAGE_FILE = "megafusion_image.safetensors"
CONFIG_FILE = "megafusion_config.json"
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_PROCESSOR_FILES = (  # a LLaVA's image processor and chat template travel with it (LLaVA-Fusion)
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
)


def open_checkpoint(ckpt_dir: str | Path) -> tuple[Config, dict, dict, Path]:
    """(config, meta.json, index.json, base Llama dir) of a training checkpoint, the base Llama checked."""
    ckpt = Path(ckpt_dir)
    meta, index, cfg = read_checkpoint_files(ckpt)
    bad = index_shape_problems(cfg.model, index, int(meta["layout"]["tp"]))
    if bad:
        raise CheckpointError(f"{ckpt}: its config.yaml does not describe its weights: " + "; ".join(bad))
    src = meta.get("frozen_source", {})
    hf_dir = Path(src.get("path", ""))
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: the base Llama {hf_dir} it was trained from is not available")
    if frozen_source_fingerprint(hf_dir)["files"] != src.get("files"):
        raise CheckpointError(f"{hf_dir} differs from the base Llama recorded in {ckpt / 'meta.json'}")
    bad = dim_conflicts(cfg.model, hf_dir, source=str(ckpt / "config.yaml"))
    if bad:
        raise CheckpointError("; ".join(bad))
    return cfg, meta, index, hf_dir


def read_checkpoint_image_side(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict, Path]:
    """A training checkpoint's image side as full tensors, with its config, meta.json and base Llama dir.

    Every model shard is verified against index.json; the base Llama must be the one recorded.
    All of it in memory: for tests and small models; the export and inference loading stream instead.
    """
    ckpt = Path(ckpt_dir)
    cfg, meta, index, hf_dir = open_checkpoint(ckpt)
    shards: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for rel in sorted(k for k in index if k.startswith("model/")):
        verify_file(ckpt, rel, index)
        tp_rank = int(rel.split("/")[1].split("_")[0][2:])  # model/tp{t}_pp{p}.safetensors
        for name, t in load_file(str(ckpt / rel)).items():
            canon = canonical_name(name)
            if canon is not None:
                shards[canon][tp_rank] = t
    full = {name: unshard(name, [by_rank[r] for r in sorted(by_rank)], cfg.model) for name, by_rank in shards.items()}
    return full, cfg, meta, hf_dir


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, log=print) -> Path:
    """Write ``out_dir`` (atomically): the base Llama's files plus the image side in full form.

    Streamed: each full image-side tensor is planned as byte runs of the checkpoint's shards
    (``CheckpointSource.runs`` at TP=1) and copied file to file, so memory stays at tens of MB
    whatever the model size and layout; every input shard is checksummed while the copy runs.
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    cfg, meta, _, hf_dir = open_checkpoint(ckpt)
    if cfg.model.architecture != "llamafusion":
        raise CheckpointError(
            f"{ckpt}: a {cfg.model.architecture} checkpoint trains its text tower, which the export "
            "(the base Llama's files, copied) cannot hold; sample and evaluate the checkpoint itself"
        )
    src = CheckpointSource(ckpt, verify=True, with_optimizer=False)
    tmp = out.with_name(out.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for f in sorted(hf_dir.iterdir()):
            if f.name in (*_HF_FILES, *_PROCESSOR_FILES) or f.name.startswith(("model-", "tokenizer")):
                shutil.copy2(f, tmp / f.name)
        names = sorted(src.model)
        entries = [
            (c, src.dtype(c), src.local_shape(c, 1, 0), lambda c=c: src.runs(c, 1, 0)) for c in names
        ]  # the full tensor = its one shard at TP=1
        write_tensor_file(tmp / IMAGE_FILE, entries, src.sources)
        src.wait_verified()
    except BaseException:
        try:
            src.wait_verified()  # a corrupted input explains a failure best
        finally:
            src.close()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    src.close()
    (tmp / CONFIG_FILE).write_text(
        json.dumps(
            {
                "model": dataclasses.asdict(cfg.model),
                "diffusion": dataclasses.asdict(cfg.diffusion),
                "step": meta["step"],
                "source_checkpoint": str(ckpt),
            },
            indent=1,
        )
    )
    publish(tmp, out)
    log(f"[export] {len(names)} image-side tensors + text tower from {hf_dir} -> {out}")
    return out


def read_local_of_full(f: TensorFile, name: str, cfg, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s TP shard of the full tensor ``name`` in ``f``, reading only what it needs.

    The same cut as ``gather.shard`` (tested equal), done with reads instead of on a full copy: a
    row-parallel shard reads the rows in chunks of ~64 MB and keeps its columns (``TensorFile.read_cols``).
    """
    kind = shard_kind(name)
    shape = f.shape(name)
    if kind == "replicated" or (tp == 1 and kind != "vocab"):
        return f.read_flat(name, 0, f.numel(name)).view(shape)
    if kind in ("qkv", "gate_up"):
        d = cfg.head_dim
        blocks = (
            [cfg.num_attention_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d]
            if kind == "qkv"
            else [shape[0] // 2, shape[0] // 2]
        )
        parts, start = [], 0
        for n in blocks:  # each block (q, k, v / gate, up) is cut into tp row blocks
            step = n // tp
            parts.append(f.read_rows(name, start + rank * step, start + (rank + 1) * step))
            start += n
        return torch.cat(parts, 0)
    if kind == "row":
        step = shape[1] // tp
        return f.read_cols(name, rank * step, (rank + 1) * step)
    # vocab (the baseline's trained embedding / head): this rank's rows of the padded vocabulary
    from megafusion.parallel.megatron_config import padded_vocab_size

    per = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp) // tp
    a, b = rank * per, min((rank + 1) * per, shape[0])
    real = f.read_rows(name, a, b) if a < b else f.read_flat(name, 0, 0).view(0, *shape[1:])
    return torch.cat([real, real.new_zeros(per - real.shape[0], *shape[1:])], 0)


@torch.no_grad()
def load_image_side(model, source: str | Path | dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the full trained tensors (a file or a dict) into ``model`` (any TP size).

    The image side for the recipe; every weight for the Transfusion baseline (``model.trains``).
    From a file, each parameter reads only its own slice (one tensor slice in memory at a time).
    """
    cfg, tp, rank = model.cfg, model.pctx.tp_size, model.pctx.tp_rank
    f = TensorFile(source) if not isinstance(source, dict) else None
    path = source if f is not None else "image side"
    try:
        for name, p in model.named_parameters():
            if not model.trains(name):
                continue
            if (name not in f) if f is not None else (name not in source):
                raise CheckpointError(f"{path}: no tensor {name!r} (exported from a different model config?)")
            local = (
                read_local_of_full(f, name, cfg, tp, rank)
                if f is not None
                else shard(name, source[name], cfg, tp, rank)
            )
            if tuple(local.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{path}: {name} gives a shard of {tuple(local.shape)}, the model has {tuple(p.shape)}"
                )
            p.copy_(local.to(dtype=p.dtype, device=p.device))
    finally:
        if f is not None:
            f.close()


def load_exported(path: str | Path, pctx: ParallelContext, *, seed: int = 1234, cls: type[M] = LlamaFusionModel) -> M:
    """A ``tools/export_hf.py`` directory as a model on this rank (any TP size): the HF text tower plus the
    trained image side."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(
            f"{path}: no {CONFIG_FILE}, so no trained image tower; for a plain HF Llama use LlamaFusion.from_hf_llama"
        )
    mcfg = config_from_dict({"model": json.loads(cfg_file.read_text())["model"]}, str(cfg_file)).model
    model = build_llamafusion(mcfg, pctx, path, seed=seed, cls=cls)
    load_image_side(model, path / IMAGE_FILE)
    return model
