"""Inference: loading a trained model from an export or a checkpoint (``load``), DDIM/DDPM steps
(``sampler``), and generation (``generate``): KV-cached text, image sampling with the prompt cached
across denoising steps, captioning, interleaved text and images."""
