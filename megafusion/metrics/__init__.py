"""Metrics users report on their own data: FID, CLIP score, captioning CIDEr/BLEU/ROUGE/METEOR, text perplexity."""
