"""Mask-aware attention FLOPs: the closed-form pair count against a brute-force count of the mask rule."""

import random

import torch

from megafusion.config import load_config
from megafusion.model.mask import hybrid_attention_mask
from megafusion.training.flops import attention_pairs, planned_attention_pairs, transformer_flops_per_step


def _brute_force_pairs(doc: list[int], img: list[int]) -> int:
    """Pairs (i, j) with same document and (j <= i or same image), by the rule in model/mask.py's docstring."""
    s = len(doc)
    return sum(
        1 for i in range(s) for j in range(s) if doc[i] == doc[j] and (j <= i or (img[i] >= 0 and img[i] == img[j]))
    )


def _packed_row(rng: random.Random, s: int, first_image: int) -> tuple[list[int], list[int], int]:
    """A packed row of documents (text runs and whole images of 4 tokens), padding last as its own document."""
    doc, img, n_img, d = [], [], first_image, 0
    while len(doc) < s - 6:
        for _ in range(rng.randint(1, 3)):  # runs of a document
            if rng.random() < 0.5 and len(doc) + 4 <= s:
                doc += [d] * 4
                img += [n_img] * 4
                n_img += 1
            else:
                k = min(rng.randint(1, 6), s - len(doc))
                doc += [d] * k
                img += [-1] * k
        d += 1
    doc += [d] * (s - len(doc))  # padding: one more document
    img += [-1] * (s - len(img))
    return doc, img, n_img


def test_attention_pairs_equal_a_brute_force_count_of_the_mask():
    rng = random.Random(0)
    for trial in range(20):
        rows, n = [], 0
        for _ in range(3):
            doc, img, n = _packed_row(rng, 48, n)
            rows.append((doc, img))
        docs = torch.tensor([r[0] for r in rows])
        imgs = torch.tensor([r[1] for r in rows])
        want = sum(_brute_force_pairs(d, i) for d, i in rows)
        assert attention_pairs(docs, imgs) == want, trial
        # and the model's own dense mask allows exactly these pairs
        assert int(hybrid_attention_mask(docs, imgs).sum()) == want


def test_flops_count_attention_over_allowed_pairs_only():
    cfg = load_config("tiny")
    s = cfg.data.seq_length
    dense = transformer_flops_per_step(cfg, s, 0, 1)
    causal = transformer_flops_per_step(cfg, s, 0, 1, pairs=s * (s + 1) // 2)
    per_pair = 12 * cfg.model.num_layers * cfg.model.hidden_size
    assert dense - causal == per_pair * (s * s - s * (s + 1) // 2)
    # the planner's estimate: one document per row, images bidirectional
    t = cfg.model.image.tokens_per_image
    est = planned_attention_pairs(cfg, 2, 0.5)
    assert est == 2 * (s * (s + 1) / 2 + (s * 0.5 / t) * t * (t - 1) / 2)
