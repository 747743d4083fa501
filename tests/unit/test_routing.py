"""Route split/merge, and that each tower multiplies only its own tokens."""

import torch

from megafusion.model.routing import Route


def test_split_merge_roundtrip_and_order():
    is_image = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    x = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)
    r = Route.from_modality(is_image, image_rows=torch.tensor([4, 1, 2]))
    t, i = r.split(x)
    assert torch.equal(t, x[[0, 3, 5]]) and torch.equal(i, x[[4, 1, 2]])
    assert torch.equal(r.merge((t, i)), x)


def test_single_modality_is_free():
    x = torch.randn(5, 4)
    r = Route.from_modality(torch.zeros(5, dtype=torch.bool))
    t, i = r.split(x)
    assert t is x and i is None and r.merge((t, None)) is x
    r = Route.from_modality(torch.ones(5, dtype=torch.bool))
    t, i = r.split(x)
    assert t is None and i is x


def test_gradients_flow_through_split_merge():
    is_image = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    x = torch.randn(4, 3, requires_grad=True)
    r = Route.from_modality(is_image)
    t, i = r.split(x)
    y = r.merge((t * 2, i * 3))
    y.sum().backward()
    assert torch.equal(x.grad[:, 0], torch.tensor([3.0, 2.0, 3.0, 2.0]))


def test_each_tower_sees_only_its_tokens(tiny_hf, monkeypatch):
    """Count the rows every F.linear of the routed layers receives: text + image rows = all tokens, once."""
    import torch.nn.functional as F

    from megafusion import LlamaFusion
    from megafusion.model import routed_linear
    from tests.helpers import TINY_IMAGE, mixed_batch

    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE)
    b = mixed_batch(300)
    rows = []
    real = F.linear
    tower_weights = {id(mod.tower(t).weight) for mod in m.routed_modules() for t in ("text", "image")}

    def counting(x, w, bias=None):
        if id(w) in tower_weights:
            rows.append(x.shape[0])
        return real(x, w, bias)

    monkeypatch.setattr(routed_linear.F, "linear", counting)
    with torch.no_grad():
        m(b)
    n_tokens, n_image = b.input_ids.numel(), 3 * TINY_IMAGE.tokens_per_image
    per_layer = 4 * 2  # qkv, o, gate_up, down x (text, image)
    assert len(rows) == per_layer * m.cfg.num_layers
    assert sorted(set(rows)) == sorted({n_tokens - n_image, n_image})
    assert sum(rows) == 4 * n_tokens * m.cfg.num_layers
