"""Training data: VAE-latent caching on Ray (``latent_cache``, ``latent_pipeline``), packing of
documents into rows (``packing``), the latent-shard loader (``loader``), synthetic batches for runs
without data (``synthetic``), and the trainer's noised stream of micro-batches (``stream``)."""
