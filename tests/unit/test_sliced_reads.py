"""Sliced reads of full tensors (``from_pretrained`` at TP=N) cut exactly what ``gather.shard`` cuts."""

import torch
from safetensors.torch import save_file

from megafusion.checkpoint.export import read_local_of_full
from megafusion.checkpoint.gather import shard
from megafusion.checkpoint.tensor_file import TensorFile
from megafusion.config import load_config


def test_read_local_of_full_equals_shard(tmp_path):
    m = load_config("tiny").model
    h, d = m.hidden_size, m.head_dim
    g = torch.Generator().manual_seed(0)
    full = {
        "layers.0.qkv.image.weight": torch.randn((m.num_attention_heads + 2 * m.num_kv_heads) * d, h, generator=g),
        "layers.0.o.image.weight": torch.randn(h, m.num_attention_heads * d, generator=g),
        "layers.0.gate_up.image.weight": torch.randn(2 * m.ffn_hidden_size, h, generator=g),
        "layers.0.down.image.weight": torch.randn(h, m.ffn_hidden_size, generator=g).to(torch.bfloat16),
        "embedding.weight": torch.randn(m.vocab_size, h, generator=g),  # the baseline's trained vocab rows
        "image_in.conv.weight": torch.randn(8, 4, 3, 3, generator=g),
    }
    save_file(full, str(tmp_path / "full.safetensors"))
    with TensorFile(tmp_path / "full.safetensors") as f:
        for tp in (1, 2, 4):
            for rank in range(tp):
                for name, t in full.items():
                    assert torch.equal(read_local_of_full(f, name, m, tp, rank), shard(name, t, m, tp, rank)), (
                        name,
                        tp,
                        rank,
                    )
        # column reads in chunks smaller than a row still give the same block
        down = full["layers.0.down.image.weight"]
        assert torch.equal(f.read_cols("layers.0.down.image.weight", 5, 77, chunk_bytes=10), down[:, 5:77])
