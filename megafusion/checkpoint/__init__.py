"""Everything on disk: the HF Llama importer, the one model builder (``build``), training checkpoints
(``files``, ``training_state``: sharded, verified, atomic), conversion HF -> checkpoint at a layout,
resharding between layouts, and export back to HF + image side. Nothing here unpickles."""
