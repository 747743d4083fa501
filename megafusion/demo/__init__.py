"""The bundled demo: shapes dataset and pixel checker, word tokenizer, tiny Llama / VAE writers and trainers,
evaluation and report. ``make demo`` (``launcher/demo.py``) and the tests use it; no core package imports it."""
