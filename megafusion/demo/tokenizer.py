"""A word-level Hugging Face tokenizer for the bundled dataset (tests and the demo; Llama-3's in real runs)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def shapes_vocabulary() -> list[str]:
    from megafusion.demo.shapes import COLORS, POSITIONS, SHAPES

    words = {"a", "at", "the", "in", "of", "image", "picture", "shows", "there", "is", "."}
    for c in COLORS:
        words.add(c)
    words.update(SHAPES)
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)


EDIT_WORDS = ["make", "it", "turn", "into", "move", "to"]
"""The editing instructions' words (megafusion/demo/shape_edits.py), after the caption words: appended,
not sorted in, so a tokenizer written before them keeps every id and a trained model still reads it."""


def demo_vocabulary() -> list[str]:
    return shapes_vocabulary() + [w for w in EDIT_WORDS if w not in shapes_vocabulary()]


def write_word_tokenizer(path: str | Path, words: Iterable[str] | None = None) -> Path:
    """Save a WordLevel tokenizer (whitespace split) with <s>, </s>, <pad>, <unk> as a tokenizer directory.

    An existing one is kept, or extended when its words are a prefix of ``words`` (the editing words
    added to a run folder made before them; no id changes).
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    order = SPECIALS + list(words if words is not None else demo_vocabulary())
    if (path / "tokenizer.json").is_file():
        have = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        old = sorted(have, key=have.get)
        if old == order or old != order[: len(old)]:
            return path
    vocab = {w: i for i, w in enumerate(order)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))
    return path
