"""Packing against hand-checked layouts; the shapes dataset's pixel checker against its own labels."""

import io
import json

import numpy as np
import torch
from PIL import Image

from megafusion.data.packing import Packer, SpecialTokens, make_document, rows_to_batch
from megafusion.demo.shapes import read_attributes, samples

SP = SpecialTokens(bos=2, eos=3, pad=0, boi=510, eoi=511)
LAT = np.ones((4, 2, 2), dtype=np.float16)


def test_hand_checked_packing():
    a = make_document([10, 11], LAT, 4, SP, caption_first=True, max_len=16)
    b = make_document([20], LAT * 2, 4, SP, caption_first=False, max_len=16)
    c = make_document([30, 31, 32], None, 4, SP, caption_first=True, max_len=16)  # text-only
    assert a.tokens == [2, 10, 11, 510, -1, -1, -1, -1, 511, 3]
    assert b.tokens == [2, 510, -1, -1, -1, -1, 511, 20, 3]
    packer = Packer(16, SP)
    for d in (a, b, c):
        packer.add(d)
    packer.rows.append(packer.current)
    assert [len(r) for r in packer.rows] == [1, 2]  # b does not fit after a (10 + 9 > 16)
    batch = rows_to_batch(packer.rows, 16, SP)
    assert batch.input_ids[0].tolist() == [2, 10, 11, 510, 0, 0, 0, 0, 511, 3, 0, 0, 0, 0, 0, 0]
    assert batch.image_ids[0].tolist() == [-1, -1, -1, -1, 0, 0, 0, 0] + [-1] * 8
    assert batch.image_ids[1].tolist() == [-1, -1, 1, 1, 1, 1] + [-1] * 10
    assert batch.document_ids[0].tolist() == [0] * 10 + [1] * 6  # padding is its own document
    assert batch.document_ids[1].tolist() == [0] * 9 + [1] * 5 + [2] * 2
    assert batch.position_ids[1].tolist() == list(range(9)) + list(range(5)) + [0, 1]
    # loss: text predicting text of the same document, never the token predicting <BOI>, never padding/EOS
    assert batch.loss_mask[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert batch.loss_mask[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0]
    assert batch.labels[0, 8].item() == 3 and batch.labels[1, 6].item() == 20
    assert batch.latents.shape == (2, 4, 2, 2) and batch.latents[1].max().item() == 2.0
    img = batch.image_ids >= 0
    assert torch.equal(batch.image_ids[img], torch.tensor([0] * 4 + [1] * 4))
    assert batch.caption_after.tolist() == [False, True]  # b's caption follows its image
    dropped = make_document([], LAT, 4, SP, caption_first=False, max_len=16)  # no caption: not a captioning pair
    assert rows_to_batch([[dropped]], 16, SP).caption_after.tolist() == [False]


def test_too_long_caption_is_cut_not_the_image():
    d = make_document(list(range(100, 150)), LAT, 4, SP, caption_first=True, max_len=16)
    assert len(d) == 16 and d.tokens.count(-1) == 4 and d.tokens[-2:] == [511, 3]


def test_shapes_checker_reads_every_label_back():
    for s in samples(120, seed=3, size=64):
        want = json.loads(s["json"])
        im = Image.open(io.BytesIO(s["png"]))
        for img in (im, im.resize((32, 32), Image.BICUBIC)):
            got = read_attributes(img)
            assert got == {k: want[k] for k in ("color", "shape", "position")}, (want, got)
    blank = Image.new("RGB", (32, 32), (245, 245, 240))
    assert read_attributes(blank)["shape"] == "none"
