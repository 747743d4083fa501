"""HF Llama directory -> a megafusion training checkpoint at a TP x PP (x VPP) layout.

The checkpoint holds what training updates: for every (tp, pp) shard, the image
tower of its layers (copies of the Llama weights, sliced for that TP rank), and on
the first/last stage the <BOI>/<EOI> rows and the U-Nets (initialised exactly as
the trainer would, from ``seed``; the last stage's tied down-sampler replica too).
The frozen text tower stays in the HF directory, recorded with its fingerprint.
It carries no optimizer state (``weights_only``): ``launcher.train`` with
``checkpoint.load=DIR`` starts from it at step 0.

Streaming: one output shard at a time, reading only the slices that shard needs,
so peak memory stays near one layer's slices plus one output shard.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from megafusion.checkpoint.files import INDEX, file_digest, frozen_source_fingerprint
from megafusion.checkpoint.gather import REPLICA
from megafusion.checkpoint.hf_import import (
    HFCheckpointError,
    SafetensorsDir,
    layer_shards,
    model_config_from_hf,
    read_hf_config,
    special_rows,
)
from megafusion.checkpoint.shapes import MODEL_DIMS, dim_conflicts, with_hf_dims
from megafusion.config.loader import dump_config
from megafusion.config.schema import Config
from megafusion.config.validate import split_problems
from megafusion.durable import publish
from megafusion.model.image_io import build_image_io
from megafusion.parallel.layout import Layout, layer_ids_for_chunk


def converted_config(
    cfg: Config, hf_dir: str | Path, explicit: Collection[str] = (), log: Callable[[str], None] | None = None
) -> Config:
    """The config a conversion of ``hf_dir`` writes: the HF model's dims, the rest from ``cfg``.

    ``explicit`` are the config keys the user set on purpose (``model.hidden_size`` from a
    ``key=value`` override): a model dim among them that contradicts the HF model is an error
    naming both values, while a preset's dims are replaced (and ``log`` says which). <BOI>/<EOI>
    keep explicit ids; otherwise they default from the HF vocabulary (Llama-3's reserved tokens,
    else the last two ids), since a preset's ids belong to the preset's vocabulary.
    """
    hf_dir = Path(hf_dir)
    stated = [d for d in MODEL_DIMS if any(k == f"model.{d}" or k.startswith(f"model.{d}.") for k in explicit)]
    bad = dim_conflicts(cfg.model, hf_dir, stated, source="the overrides")
    if bad:
        raise HFCheckpointError("; ".join(bad))
    m, changed = with_hf_dims(cfg.model, hf_dir)
    defaults = model_config_from_hf(read_hf_config(hf_dir))
    specials = {
        k: getattr(cfg.model if f"model.{k}" in explicit else defaults, k) for k in ("boi_token_id", "eoi_token_id")
    }
    for k, v in specials.items():
        if not 0 <= v < m.vocab_size:
            raise HFCheckpointError(f"model.{k}={v} is outside {hf_dir}'s vocabulary of {m.vocab_size} tokens")
    if specials["boi_token_id"] == specials["eoi_token_id"]:
        raise HFCheckpointError(f"model.boi_token_id and model.eoi_token_id are both {specials['boi_token_id']}")
    m = replace(m, **specials)
    if changed and log is not None:
        log(f"[convert] model dims from {hf_dir / 'config.json'} (not {cfg.name!r}): " + ", ".join(changed))
    return replace(cfg, model=m)


def convert_hf_llama(
    hf_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    tp: int,
    pp: int,
    vpp: int | None = None,
    progress: bool = True,
    explicit: Collection[str] = (),
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out_dir`` (atomically) and return it.

    ``cfg`` supplies the image side, seed and the rest; the model dims come from ``hf_dir``
    (see :func:`converted_config`, which also explains ``explicit``). The written
    ``config.yaml`` describes the weights and the layout, so it can be passed back as
    ``launcher.train --config``.
    """
    from tqdm import tqdm

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if cfg.model.architecture != "llamafusion":
        raise ValueError(
            f"model.architecture={cfg.model.architecture!r}: conversion writes the image tower of the "
            "recipe; start the baseline from the HF Llama itself (checkpoint.hf_llama, no checkpoint.load)"
        )
    cfg = converted_config(cfg, hf_dir, explicit, log)
    m = cfg.model
    vpp = vpp or 1
    problems = split_problems(m, tp, pp, vpp)
    if problems:
        raise ValueError(
            f"{hf_dir}: cannot be split as {Layout(tp, pp, vpp=vpp).model_parallel}: "
            + "; ".join(p.short() for p in problems)
        )
    r = SafetensorsDir(hf_dir)
    # the U-Nets exactly as the trainer builds them (same seeded builder)
    image_in, image_out = build_image_io(cfg.model.image, m.hidden_size, m.rms_norm_eps, cfg.seed)
    unet_in, unet_out = image_in.state_dict(), image_out.state_dict()
    final_norm = r.get("model.norm.weight")
    specials = special_rows(r, m.boi_token_id, m.eoi_token_id)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "model").mkdir(parents=True)
    t0 = time.time()
    bar = tqdm(total=tp * pp, desc="converting", unit="shard", disable=not progress)
    index = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            tensors: dict[str, torch.Tensor] = {}

            for chunk in range(vpp):
                pre = f"{chunk}.core."
                first, last = pp_rank == 0 and chunk == 0, pp_rank == pp - 1 and chunk == vpp - 1
                for i in layer_ids_for_chunk(m.num_layers, pp, vpp, pp_rank, chunk):
                    for rel, t in layer_shards(r, i, tp, tp_rank).items():  # the image tower = a copy
                        proj, kind = rel.split(".")
                        tensors[f"{pre}layers.{i}.{proj}.{'image.weight' if kind == 'weight' else 'norm.image'}"] = t
                if first:
                    tensors[pre + "special_embedding"] = specials
                    tensors.update({pre + "image_in." + k: v for k, v in unet_in.items()})
                if last:
                    out_sd = dict(unet_out)
                    if "norm_in.weight" in out_sd:
                        out_sd["norm_in.weight"] = final_norm
                    tensors.update({pre + "image_out." + k: v for k, v in out_sd.items()})
                    if not first and cfg.model.image.io == "unet":
                        tensors.update({f"{chunk}.{REPLICA}." + k: v for k, v in unet_in.items()})
            rel = f"model/tp{tp_rank}_pp{pp_rank}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / rel))
            index[rel] = file_digest(tmp / rel)
            del tensors
            bar.update(1)
    bar.close()
    r.close()
    layout = {"tp": tp, "pp": pp, "vpp": vpp}
    meta = {
        "step": 0,
        "weights_only": True,
        "layout": layout,
        "frozen_source": frozen_source_fingerprint(hf_dir),
        "converted_from": str(hf_dir),
        "seconds": round(time.time() - t0, 2),
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    par = replace(
        cfg.parallel, tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_stages=vpp if vpp > 1 else None
    )
    dump_config(replace(cfg, parallel=par), tmp / "config.yaml")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return publish(tmp, out)
