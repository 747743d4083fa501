"""Image editing at TP=2 (gloo) gives the TP=1 edits: the cached prefix, both guidance scales."""

import torch

from tests.distributed.test_inference_tp import BOS, _pretrained_dir
from tests.helpers import run_distributed

INSTRUCTIONS = [[9, 10, 11], [12]]


def _edit(model):
    src = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    return model.edit_image(src, INSTRUCTIONS, BOS, num_steps=4, text_guidance=3.0, image_guidance=1.5, generator=g)


def _tp_worker(rank, world, path):
    from megafusion import LlamaFusion
    from megafusion.parallel.process_groups import ParallelContext, init_model_parallel

    init_model_parallel(world, 1)
    model = LlamaFusion.from_pretrained(path, pctx=ParallelContext.current()).eval()
    assert model.pctx.tp_size == world
    return _edit(model)


def test_tp2_edits_match_tp1(tmp_path):
    from megafusion import LlamaFusion

    path = _pretrained_dir(tmp_path)
    ref = _edit(LlamaFusion.from_pretrained(str(path)).eval())
    for got in run_distributed(_tp_worker, 2, str(path)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
