"""Instruction-based image editing: a source image and an instruction in, the edited image out.

The sequence is the training layout of an editing triple (``data/packing.py``):

    <s> <BOI> source <EOI> instruction <BOI> [target being denoised]

The source enters clean (timestep 0) and the prefix up to the target's <BOI> is computed once into
the KV cache and reused, frozen, by every denoising step. Guidance has two scales, as in
InstructPix2Pix and BAGEL, from three rows per edit in one batch:

    cond           <s> <BOI> source <EOI> instruction <BOI>
    text-uncond    <s> <BOI> source <EOI> <BOI>              (the instruction dropped)
    image-uncond   <s> <BOI>                                 (instruction and source dropped)

    eps = e(0, 0) + s_image * (e(src, 0) - e(0, 0)) + s_text * (e(src, instr) - e(src, 0))

With only ``text_guidance`` the image-uncond rows are not run (eps = e(src, 0) + s_text * (...));
with neither, only the cond rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megafusion.diffusion.schedule import CosineSchedule
from megafusion.inference.generate import _check_latents, _device, _image_batch, _need_generator, _prompt_list
from megafusion.inference.sampler import eta_of, per_image_noise, step, timesteps
from megafusion.model.batch import FusionBatch
from megafusion.model.kv_cache import KVCache

Item = int | torch.Tensor  # a token id, or a clean latent [C, H, W] standing for one image


def mixed_rows(model, rows: Sequence[Sequence[Item]], t_last: torch.Tensor | None = None) -> FusionBatch:
    """Rows of token ids and clean latents -> one left-padded batch (padding is its own document).

    Images are numbered in order of appearance, row by row, as ``FusionBatch`` requires, at timestep 0;
    ``t_last`` [b] gives each row's last image that timestep instead (the image being denoised).
    """
    dev, T = _device(model), model.cfg.image.tokens_per_image
    lens = [sum(T if isinstance(x, torch.Tensor) else 1 for x in r) for r in rows]
    b, length = len(rows), max(lens)
    ids = torch.zeros(b, length, dtype=torch.long)
    img = torch.full((b, length), -1, dtype=torch.long)
    doc = torch.full((b, length), -1, dtype=torch.long)
    pos = torch.zeros(b, length, dtype=torch.long)
    latents, ts = [], []
    for i, (r, n) in enumerate(zip(rows, lens, strict=True)):
        at = length - n
        doc[i, at:] = 0
        pos[i, at:] = torch.arange(n)
        last = max((k for k, x in enumerate(r) if isinstance(x, torch.Tensor)), default=-1)
        for k, x in enumerate(r):
            if isinstance(x, torch.Tensor):
                img[i, at : at + T] = len(latents)
                latents.append(x)
                ts.append(int(t_last[i]) if t_last is not None and k == last else 0)
                at += T
            else:
                ids[i, at] = int(x)
                at += 1
    batch = FusionBatch(input_ids=ids, image_ids=img, position_ids=pos, document_ids=doc).to(dev)
    if latents:
        batch.latents = torch.stack(latents).to(dev, model.params_dtype)
        batch.timesteps = torch.tensor(ts, dtype=torch.long, device=dev)
    return batch


@torch.no_grad()
def edit_image(
    model,
    source_latents: torch.Tensor,
    instructions: Sequence[Sequence[int]] | torch.Tensor,
    bos_token_id: int,
    num_steps: int = 50,
    sampler: str = "ddim",
    eta: float | None = None,
    text_guidance: float | None = None,
    image_guidance: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    num_train_timesteps: int = 1000,
    prediction: str = "epsilon",
    progress: bool = False,
) -> torch.Tensor:
    """Clean source latents [n, C, H, W] and one instruction (ids, no <s>) per source -> edited latents [n, ...].

    ``text_guidance`` / ``image_guidance``: the two guidance scales (None: that guidance off; image guidance
    needs text guidance). ``use_cache=False`` recomputes the whole sequence at every step (the reference the
    cache is tested against). ``prediction``: the model's ``diffusion.prediction``.
    """
    from tqdm import tqdm

    _check_latents(model, source_latents)
    instr = _prompt_list(model, instructions, "instruction") if len(instructions) else []
    n = source_latents.shape[0]
    if len(instr) != n:
        raise ValueError(f"{n} source images but {len(instr)} instructions")
    if image_guidance is not None and text_guidance is None:
        raise ValueError("image_guidance needs text_guidance (set text_guidance=1.0 for image guidance alone)")
    _need_generator(model, generator, "image editing")
    cfg = model.cfg
    boi, eoi = cfg.boi_token_id, cfg.eoi_token_id
    src = source_latents.float().cpu()
    prefixes = [[bos_token_id, boi, src[i], eoi, *instr[i], boi] for i in range(n)]
    if text_guidance is not None:
        prefixes += [[bos_token_id, boi, src[i], eoi, boi] for i in range(n)]
    if image_guidance is not None:
        prefixes += [[bos_token_id, boi] for _ in range(n)]
    rows = len(prefixes)
    dev, dtype = _device(model), model.params_dtype
    prefix = mixed_rows(model, prefixes)
    lengths = prefix.position_ids[:, -1] + 1  # [rows] where each row's target image starts
    if use_cache:
        cache = KVCache(rows, max_len=prefix.input_ids.shape[1] + cfg.image.tokens_per_image)
        model.forward_cached(prefix, cache, logits=False)
        cache.frozen = True

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((rows,), t, dtype=torch.long, device=dev)
            return model.forward_cached(_image_batch(model, x.to(dev, dtype), tt, lengths), cache, logits=False)[1]
    else:

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((rows,), t, dtype=torch.long)
            whole = mixed_rows(model, [p + [x[i]] for i, p in enumerate(prefixes)], t_last=tt)
            pred = model(whole, check=False).image_pred
            last = [int(whole.image_ids[i].max()) for i in range(rows)]  # each row's last image: its target
            return pred[last]

    img = cfg.image
    schedule = CosineSchedule(num_train_timesteps)
    ts = timesteps(num_train_timesteps, num_steps)
    eta = eta_of(sampler, eta)
    x = per_image_noise((n, img.latent_channels, img.latent_size, img.latent_size), generator)
    k = rows // n
    for i, t in enumerate(tqdm(ts, desc="editing", unit="step", disable=not progress)):
        eps = predict(torch.cat([x] * k), t).float().cpu()
        parts = eps.chunk(k)
        if k == 1:
            guided = parts[0]
        elif k == 2:
            cond, no_text = parts
            guided = no_text + text_guidance * (cond - no_text)
        else:
            cond, no_text, none = parts
            guided = none + image_guidance * (no_text - none) + text_guidance * (cond - no_text)
        x = step(schedule, x, guided, t, ts[i + 1] if i + 1 < len(ts) else -1, eta, generator, prediction=prediction)
    return x
