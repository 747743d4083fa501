"""Text generation, text -> image sampling, captioning and interleaved generation on a LlamaFusion.

Sequences follow the training format (``data/packing.py``):

    text -> image :  <s> caption <BOI> [image tokens] <EOI>
    image -> text :  <s> <BOI> [image tokens] <EOI> caption </s>

Everything runs through ``LlamaFusion.forward_cached`` with a :class:`KVCache`:
a prompt's keys/values are computed once; each decoded token, and each denoising
step of an image, runs only its new tokens against the cache. A denoising step
uses the cache frozen, so the prefix is computed once per prompt, not per step.

Tensor parallel: every rank runs the same calls with the same seed. Logits are
gathered over TP and the U-Nets are replicated, so ranks draw identical tokens
and noise without any extra communication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megafusion.diffusion.schedule import CosineSchedule
from megafusion.inference.sampler import eta_of, per_image_noise, step, timesteps
from megafusion.model.batch import FusionBatch
from megafusion.model.kv_cache import KVCache

Prompts = torch.Tensor | Sequence[Sequence[int]]

EOS_CHECK_EVERY = 16  # greedy decoding asks the device whether every row has finished once per this many tokens


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _need_generator(model, generator: torch.Generator | None, what: str) -> None:
    """TP ranks must draw the same random numbers: require an explicitly seeded generator there."""
    if generator is None and model.pctx.tp_size > 1:
        raise ValueError(
            f"{what} at tensor-parallel size {model.pctx.tp_size} needs generator= (the same seed on "
            "every rank), otherwise ranks draw different tokens or noise"
        )


def _prompt_list(model, prompts: Prompts, what: str = "prompt") -> list[list[int]]:
    """Validate prompts (a [b, s] tensor or lists of ids) and return them as lists."""
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2:
            raise ValueError(f"{what} ids must be [batch, seq], got shape {tuple(prompts.shape)}")
        rows = prompts.tolist()
    else:
        rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError(f"no {what}s given")
    vocab = model.cfg.vocab_size
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"{what} {i} is empty (it needs at least the <s> token)")
        bad = [t for t in r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} {i} has token ids outside [0, {vocab}): {bad[:5]}")
    return rows


def next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [b, V] -> token ids [b]: argmax, or a draw at ``temperature`` from the top-p nucleus."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    draw = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return draw.to(logits.device)


def _decode(
    model,
    cache: KVCache,
    logits: torch.Tensor,
    next_pos: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    banned: Sequence[int] = (),
    eos_check_every: int = EOS_CHECK_EVERY,
) -> torch.Tensor:
    """Autoregressive tokens [b, n] after the cached prefix; rows that emitted EOS are padded with EOS.

    ``n`` stops at the first token after which every row has emitted EOS (else
    ``max_new_tokens``). Whether all rows are done is a host sync, so greedy decoding
    asks only every ``eos_check_every`` tokens; finished rows meanwhile keep emitting
    EOS (``done`` lives on the device) and the surplus columns are cut at the end, so the
    result is the same as checking every token. Sampling draws on the host anyway
    (``next_token``), so it checks every token: its generator then advances exactly as
    many draws as tokens returned, and a reused generator continues where it did before.
    """
    if do_sample:
        _need_generator(model, generator, "sampling text")
    if eos_check_every < 1:
        raise ValueError(f"eos_check_every must be >= 1, got {eos_check_every}")
    check_every = 1 if do_sample else eos_check_every
    b = logits.shape[0]
    dev = logits.device
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # [b], never read on the host between checks
    out: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        if banned:
            logits = logits.clone()
            logits[:, list(banned)] = float("-inf")
        tok = next_token(logits, do_sample, temperature, top_p, generator)
        if eos_token_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
            done = done | (tok == eos_token_id)
        out.append(tok)
        if i == max_new_tokens - 1:
            break
        if eos_token_id is not None and (i + 1) % check_every == 0 and bool(done.all()):
            break
        batch = FusionBatch(
            input_ids=tok[:, None],
            image_ids=torch.full((b, 1), -1, device=dev),
            position_ids=(next_pos + i)[:, None],
            document_ids=torch.zeros(b, 1, dtype=torch.long, device=dev),
        )
        logits, _ = model.forward_cached(batch, cache)
    if not out:
        return torch.zeros(b, 0, dtype=torch.long, device=dev)
    new = torch.stack(out, 1)  # [b, n]
    if eos_token_id is not None and check_every > 1:
        # a column of all EOS is the step at which the last row finished (done rows emit only EOS)
        all_eos = (new == eos_token_id).all(0)  # [n]
        n = int(torch.where(all_eos.any(), all_eos.int().argmax() + 1, new.shape[1]))  # one sync per call
        new = new[:, :n]
    return new


@torch.no_grad()
def generate_text(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    eos_check_every: int = EOS_CHECK_EVERY,
    pixel_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """[b, s] prompt ids (same length, no padding) -> [b, s + n]: the prompt then the new tokens, like HF generate.

    ``eos_check_every``: tokens between host checks of whether all rows have emitted EOS
    (greedy; the output does not depend on it, see ``_decode``). ``pixel_values`` [n, 3, H, W]: pictures for
    a LLaVA-Fusion's frozen vision path, whose features fill the prompt's ``<image>`` placeholders (captioning
    and visual questions the VLM's way, exactly as ``LlavaForConditionalGeneration.generate``).
    """
    _prompt_list(model, input_ids)
    dev = _device(model)
    input_ids = input_ids.to(dev)
    b, s = input_ids.shape
    cache = KVCache(b, max_len=s + max(max_new_tokens, 1))  # prompt + new tokens (the last is never fed back)
    prompt = FusionBatch.text_only(input_ids)
    prompt.pixel_values = pixel_values
    logits, _ = model.forward_cached(prompt, cache)
    new = _decode(
        model,
        cache,
        logits,
        torch.full((b,), s, device=dev),
        max_new_tokens,
        eos_token_id,
        do_sample,
        temperature,
        top_p,
        generator,
        eos_check_every=eos_check_every,
    )
    return torch.cat([input_ids, new], 1)


def _left_padded(rows: list[list[int]], dev: torch.device) -> tuple[FusionBatch, torch.Tensor]:
    """Text rows of unequal length -> a left-padded batch (padding is its own document) and row lengths."""
    b, length = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(b, length, dtype=torch.long)
    doc = torch.full((b, length), -1, dtype=torch.long)  # padding: another document, never attended to
    pos = torch.zeros(b, length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        doc[i, length - len(r) :] = 0
        pos[i, length - len(r) :] = torch.arange(len(r))
    batch = FusionBatch(input_ids=ids, image_ids=torch.full((b, length), -1), position_ids=pos, document_ids=doc)
    return batch.to(dev), torch.tensor([len(r) for r in rows], device=dev)


def _image_batch(
    model, latents: torch.Tensor, t: torch.Tensor, start: torch.Tensor, extra_ids: Sequence[int] = ()
) -> FusionBatch:
    """One image per row (row i = image i) at positions start[i]..., then optional text ids (e.g. <EOI>)."""
    b = latents.shape[0]
    dev = latents.device
    T = model.cfg.image.tokens_per_image
    n = T + len(extra_ids)
    ids = torch.zeros(b, n, dtype=torch.long, device=dev)
    img = torch.full((b, n), -1, dtype=torch.long, device=dev)
    img[:, :T] = torch.arange(b, device=dev)[:, None]
    if extra_ids:
        ids[:, T:] = torch.tensor(list(extra_ids), device=dev)
    pos = start[:, None] + torch.arange(n, device=dev)[None]
    return FusionBatch(
        input_ids=ids,
        image_ids=img,
        position_ids=pos,
        document_ids=torch.zeros(b, n, dtype=torch.long, device=dev),
        latents=latents,
        timesteps=t,
    )


def _denoise(
    model,
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    n: int,
    guidance_scale: float | None,
    num_steps: int,
    sampler: str,
    eta: float | None,
    num_train_timesteps: int,
    generator: torch.Generator | None,
    progress: bool,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """Sample n latents [n, C, H, W]; ``predict(x, t)`` gives eps or v for x (both CFG halves when guided)."""
    from tqdm import tqdm

    _need_generator(model, generator, "image sampling")
    img = model.cfg.image
    eta = eta_of(sampler, eta)
    schedule = CosineSchedule(num_train_timesteps)
    ts = timesteps(num_train_timesteps, num_steps)
    x = per_image_noise((n, img.latent_channels, img.latent_size, img.latent_size), generator)
    for i, t in enumerate(tqdm(ts, desc="denoising", unit="step", disable=not progress)):
        xin = torch.cat([x, x]) if guidance_scale is not None else x
        eps = predict(xin, t).float().cpu()
        if guidance_scale is not None:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = step(schedule, x, eps, t, ts[i + 1] if i + 1 < len(ts) else -1, eta, generator, prediction=prediction)
    return x


@torch.no_grad()
def generate_images(
    model,
    prompts: Prompts,
    num_steps: int = 50,
    sampler: str = "ddim",
    eta: float | None = None,
    guidance_scale: float | None = None,
    uncond_prompt: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    num_train_timesteps: int = 1000,
    progress: bool = False,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """Caption ids (each starting with <s>, as in training) -> sampled latents [n, C, H, W] (float32, CPU).

    ``guidance_scale`` None samples unguided; a number runs classifier-free guidance with
    the unconditional rows (``uncond_prompt``, default each prompt's first token, the
    <s> of a dropped caption) in the same batch. ``use_cache=False`` recomputes the whole
    sequence at every step (the reference the cache is tested against). ``prediction`` is the
    model's training target (``diffusion.prediction``: 'epsilon' or 'v').
    """
    rows = _prompt_list(model, prompts)
    n = len(rows)
    boi = model.cfg.boi_token_id
    seqs = [r + [boi] for r in rows]
    if guidance_scale is not None:
        seqs += [list(uncond_prompt if uncond_prompt is not None else r[:1]) + [boi] for r in rows]
    dev = _device(model)
    prefix, lengths = _left_padded(seqs, dev)
    dtype = model.params_dtype
    if use_cache:
        # the prefix, then each step's image tokens written as frozen scratch after it
        cache = KVCache(len(seqs), max_len=prefix.input_ids.shape[1] + model.cfg.image.tokens_per_image)
        model.forward_cached(prefix, cache, logits=False)
        cache.frozen = True

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=dev)
            return model.forward_cached(_image_batch(model, x.to(dev, dtype), tt, lengths), cache, logits=False)[1]
    else:

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=dev)
            image = _image_batch(model, x.to(dev, dtype), tt, lengths)
            whole = FusionBatch(
                input_ids=torch.cat([prefix.input_ids, image.input_ids], 1),
                image_ids=torch.cat([prefix.image_ids, image.image_ids], 1),
                position_ids=torch.cat([prefix.position_ids, image.position_ids], 1),
                document_ids=torch.cat([prefix.document_ids, image.document_ids], 1),
                latents=image.latents,
                timesteps=tt,
            )
            return model(whole, check=False).image_pred

    return _denoise(
        model, predict, n, guidance_scale, num_steps, sampler, eta, num_train_timesteps, generator, progress, prediction
    )


def _check_latents(model, latents: torch.Tensor) -> None:
    img = model.cfg.image
    want = (img.latent_channels, img.latent_size, img.latent_size)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
        raise ValueError(
            f"latents must be [n, {want[0]}, {want[1]}, {want[2]}] (images of {img.image_size} px "
            f"through the VAE), got shape {tuple(latents.shape)}"
        )


def _until_eos(rows: list[list[int]], eos_token_id: int | None) -> list[list[int]]:
    if eos_token_id is None:
        return rows
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


@torch.no_grad()
def caption(
    model,
    latents: torch.Tensor | None,
    bos_token_id: int,
    eos_token_id: int | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_check_every: int = EOS_CHECK_EVERY,
    pixel_values: torch.Tensor | None = None,
    prompt_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Clean image latents [n, C, H, W] -> caption ids per image (up to, not including, EOS).

    LLaVA-Fusion: ``pixel_values`` [n, 3, H, W] instead of latents captions through the VLM's frozen path,
    each prompt ``<s> <image> x P prompt_ids`` (``prompt_ids``: e.g. the tokens of "\nASSISTANT:"), exactly
    as the VLM would; the image tower is not involved.
    """
    if pixel_values is not None:
        if latents is not None:
            raise ValueError("caption takes latents (image tower) or pixel_values (a LLaVA's vision path), not both")
        if model.vision_spec is None:
            raise ValueError("caption(pixel_values=...) needs a model built from a LLaVA (it has no vision tower)")
        spec, n = model.vision_spec, pixel_values.shape[0]
        row = [bos_token_id, *[spec.image_token_id] * spec.tokens_per_image, *map(int, prompt_ids)]
        ids = torch.tensor([row] * n, device=_device(model))
        out = generate_text(
            model,
            ids,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            eos_token_id,
            generator,
            eos_check_every,
            pixel_values=pixel_values,
        )
        return _until_eos(out[:, len(row) :].tolist(), eos_token_id)
    _check_latents(model, latents)
    dev = _device(model)
    n = latents.shape[0]
    cfg = model.cfg
    T = cfg.image.tokens_per_image
    cache = KVCache(n, max_len=2 + T + 1 + max(max_new_tokens, 1))  # <s> <BOI> image <EOI> caption
    head = FusionBatch(
        input_ids=torch.tensor([[bos_token_id, cfg.boi_token_id]] * n, device=dev),
        image_ids=torch.full((n, 2), -1, device=dev),
        document_ids=torch.zeros(n, 2, dtype=torch.long, device=dev),
    )
    model.forward_cached(head, cache, logits=False)
    t0 = torch.zeros(n, dtype=torch.long, device=dev)  # clean image: timestep 0
    start = torch.full((n,), 2, device=dev)
    logits, _ = model.forward_cached(
        _image_batch(model, latents.to(dev, model.params_dtype), t0, start, [cfg.eoi_token_id]), cache
    )
    new = _decode(
        model,
        cache,
        logits,
        start + T + 1,
        max_new_tokens,
        eos_token_id,
        do_sample,
        temperature,
        top_p,
        generator,
        banned=(cfg.boi_token_id, cfg.eoi_token_id),
        eos_check_every=eos_check_every,
    )
    return _until_eos(new.tolist(), eos_token_id)


@torch.no_grad()
def generate_interleaved(
    model,
    input_ids: Sequence[int],
    max_new_tokens: int = 64,
    max_images: int = 1,
    eos_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_steps: int = 50,
    sampler: str = "ddim",
    eta: float | None = None,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    progress: bool = False,
    prediction: str = "epsilon",
) -> tuple[list[int], list[torch.Tensor]]:
    """One prompt -> (ids, images): text until the model emits <BOI>, an image sampled in place
    (attending to everything before it), <EOI>, then text again; at most ``max_images``
    images (after that <BOI> is never drawn). Unguided. The ids hold <BOI>/<EOI> where
    images were made; ``images`` are their latents [C, H, W] in order.

    The recipe keeps the LM head frozen, so its <BOI> row is the base Llama's (an unused
    reserved token): a trained model rarely opens an image by itself. End the prompt
    with <BOI> to place an image there.
    """
    (prompt,) = _prompt_list(model, [list(input_ids)])
    if do_sample:
        _need_generator(model, generator, "sampling text")
    cfg = model.cfg
    dev = _device(model)
    # the prompt, every fed-back token, and each image with its <EOI> (denoising scratch fits in the latter)
    cache = KVCache(1, max_len=len(prompt) + max_new_tokens + max_images * (cfg.image.tokens_per_image + 1))
    logits, _ = model.forward_cached(FusionBatch.text_only(torch.tensor([prompt], device=dev)), cache)
    pos, out, images, made = len(prompt), list(prompt), [], 0
    while True:
        if out[-1] == cfg.boi_token_id and len(images) < max_images:  # (a prompt may end in <BOI> too)
            start = torch.tensor([pos], device=dev)

            def predict(x: torch.Tensor, t: int, start: torch.Tensor = start) -> torch.Tensor:
                tt = torch.full((1,), t, dtype=torch.long, device=dev)
                return model.forward_cached(
                    _image_batch(model, x.to(dev, model.params_dtype), tt, start), cache, logits=False
                )[1]

            cache.frozen = True  # every denoising step attends to the same prefix
            try:
                latent = _denoise(
                    model,
                    predict,
                    1,
                    None,
                    num_steps,
                    sampler,
                    eta,
                    num_train_timesteps,
                    generator,
                    progress,
                    prediction,
                )
            finally:
                cache.frozen = False
            images.append(latent[0])
            t0 = torch.zeros(1, dtype=torch.long, device=dev)  # the finished image enters the context clean
            logits, _ = model.forward_cached(
                _image_batch(model, latent.to(dev, model.params_dtype), t0, start, [cfg.eoi_token_id]), cache
            )
            pos += cfg.image.tokens_per_image + 1
            out.append(cfg.eoi_token_id)
        if made >= max_new_tokens:
            break
        banned = [cfg.eoi_token_id] + ([cfg.boi_token_id] if len(images) >= max_images else [])
        logits = logits.clone()
        logits[:, banned] = float("-inf")
        tok = int(next_token(logits, do_sample, temperature, top_p, generator)[0])
        out.append(tok)
        made += 1
        if tok == eos_token_id:
            break
        one = torch.tensor([[tok]], device=dev)
        logits, _ = model.forward_cached(
            FusionBatch(
                input_ids=one, image_ids=torch.full_like(one, -1), position_ids=torch.tensor([[pos]], device=dev)
            ),
            cache,
        )
        pos += 1
    return out, images
