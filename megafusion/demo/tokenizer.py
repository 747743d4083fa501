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


def write_word_tokenizer(path: str | Path, words: Iterable[str] | None = None) -> Path:
    """Save a WordLevel tokenizer (whitespace split) with <s>, </s>, <pad>, <unk> as a tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return path
    vocab = {w: i for i, w in enumerate(SPECIALS + list(words if words is not None else shapes_vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))
    return path
