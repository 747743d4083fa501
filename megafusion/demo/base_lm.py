"""Pretrain the small text-only Llama the bundled pipeline starts from (Hugging Face format).

LlamaFusion adapts a *pretrained* language model; none can be downloaded here, so
this trains a tiny ``LlamaForCausalLM`` briefly on sentences about the shapes
world (the words of the bundled word tokenizer) and saves it with
``save_pretrained``, like any HF Llama. ``perplexity`` is the language score the
report compares before and after multimodal training.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megafusion.config.schema import ModelConfig
from megafusion.demo.shapes import COLORS, POSITIONS, SHAPES, caption_for
from megafusion.durable import publish

_TEMPLATES = (
    "{cap} .",
    "the image shows {cap} .",
    "there is {cap} .",
    "the picture shows {cap} .",
    "in the picture there is {cap} .",
)


def text_corpus(n: int, seed: int) -> list[str]:
    """n sentences about coloured shapes at positions (one or two per line)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.choice((1, 2))):
            cap = caption_for(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)))
            parts.append(rng.choice(_TEMPLATES).format(cap=cap))
        out.append(" ".join(parts))
    return out


def _batches(tok, texts: list[str], batch: int, seq: int, rng: random.Random):
    """Packed [batch, seq] id blocks: <s> text </s> <s> text </s> ... (an endless stream)."""
    stream: list[int] = []
    while True:
        while len(stream) < batch * seq:
            stream += [
                tok.bos_token_id,
                *tok(rng.choice(texts), add_special_tokens=False)["input_ids"],
                tok.eos_token_id,
            ]
        block, stream = stream[: batch * seq], stream[batch * seq :]
        yield torch.tensor(block).view(batch, seq)


@torch.no_grad()
def sequence_perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], tok, texts: list[str]) -> float:
    """Token-level perplexity on texts (each <s> text </s>); ``logits_of`` maps ids [1, s] to logits [1, s, V]."""
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]])
        logits = logits_of(ids)[0, :-1].double()  # on the model's device
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def perplexity(model_dir: str | Path, tokenizer_dir: str | Path, texts: list[str]) -> float:
    """Perplexity of a HF causal LM loaded from disk (see :func:`sequence_perplexity`)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    return sequence_perplexity(lambda ids: model(ids).logits, tok, texts)


def train_base_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    m: ModelConfig,
    steps: int = 300,
    batch: int = 16,
    seq: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 50,
) -> dict:
    """Train and save (atomically) a LlamaForCausalLM with ``m``'s dimensions; returns {"perplexity", ...}."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megafusion.demo.tiny_llama import hf_llama_config

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if len(tok) > m.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(tok)} tokens, model.vocab_size is {m.vocab_size}")
    hf_cfg = hf_llama_config(m, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg)
    texts = text_corpus(4000, seed)
    held_out = text_corpus(200, seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    data = _batches(tok, texts, batch, seq, random.Random(seed))
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        ids = next(data)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log(f"[base-llama] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    publish(tmp, out)
    ppl = perplexity(out, out, held_out)
    log(f"[base-llama] held-out perplexity {ppl:.3f}; saved {out}")
    return {"perplexity": ppl, "seconds": round(time.time() - t0, 1)}
