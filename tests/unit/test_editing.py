"""Image editing (issue 21, first part): triples through precompute, packing, the loss and cached sampling.

References that do not share the code under test: the hand-written token layout of one triple, a
plain ``F.mse_loss`` on the target images only, the tars read with ``tarfile``, and full recomputation
of the whole sequence at every denoising step.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megafusion import LlamaFusion
from megafusion.data.packing import SpecialTokens, make_edit_document, rows_to_batch
from tests.helpers import TINY_IMAGE

ROOT = Path(__file__).resolve().parents[2]
SP = SpecialTokens(bos=1, eos=2, pad=0, boi=297, eoi=298)
T = 4  # tokens per image in the hand-checked layout


def test_triple_layout_masks_and_clean_source():
    src, tgt = np.full((4, 8, 8), 1.0, np.float32), np.full((4, 8, 8), 2.0, np.float32)
    doc = make_edit_document([7, 8, 9], src, tgt, T, SP, max_len=32)
    b = rows_to_batch([[doc]], 24, SP)
    want = [1, 297, 0, 0, 0, 0, 298, 7, 8, 9, 297, 0, 0, 0, 0, 298, 2] + [0] * 7
    assert b.input_ids[0].tolist() == want
    assert b.image_ids[0].tolist() == [-1, -1, 0, 0, 0, 0, -1, -1, -1, -1, -1, 1, 1, 1, 1] + [-1] * 9
    assert torch.equal(b.latents[0], torch.from_numpy(src)) and torch.equal(b.latents[1], torch.from_numpy(tgt))
    assert b.clean_images.tolist() == [True, False] and b.caption_after.tolist() == [False, False]
    assert b.loss_mask.sum() == 0  # no LM loss on the instruction by default
    with_loss = rows_to_batch([[make_edit_document([7, 8, 9], src, tgt, T, SP, 32, instruction_loss=True)]], 24, SP)
    # targets 7, 8, 9 (from the source's <EOI>, 7, 8) and </s> (from the target's <EOI>); never a <BOI>
    assert torch.nonzero(with_loss.loss_mask[0]).flatten().tolist() == [6, 7, 8, 15]
    dropped = rows_to_batch([[make_edit_document([7, 8], None, tgt, T, SP, 32)]], 16, SP)
    assert dropped.input_ids[0, :4].tolist() == [1, 7, 8, 297] and dropped.clean_images is None  # instruction -> target


def test_source_is_never_noised_and_takes_no_loss():
    from megafusion.config import load_config
    from megafusion.data.stream import noised_item
    from megafusion.diffusion.objective import diffusion_mse
    from megafusion.diffusion.schedule import CosineSchedule

    src, tgt = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    batch = rows_to_batch(
        [[make_edit_document([7], src, tgt, T, SP, 32)], [make_edit_document([5], tgt, src, T, SP, 32)]], 20, SP
    )
    cfg = load_config("tiny")
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 500, 900, 300])
    item = noised_item(batch, noise, t, CosineSchedule(1000), cfg, torch.device("cpu"))
    clean = batch.clean_images
    assert torch.equal(item.batch.latents[clean], batch.latents[clean])  # bit for bit
    assert item.batch.timesteps.tolist() == [0, 500, 0, 300]
    assert not torch.allclose(item.batch.latents[~clean], batch.latents[~clean])
    pred = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = diffusion_mse(pred, item.noise, pred, clean)
    torch.testing.assert_close(got, F.mse_loss(pred[~clean], item.noise[~clean]))


@pytest.fixture(scope="module")
def model(tiny_hf):
    torch.manual_seed(0)
    m = LlamaFusion.from_hf_llama(str(tiny_hf), image=TINY_IMAGE, boi_token_id=297, eoi_token_id=298).eval()
    with torch.no_grad():  # a perturbed image side, so the prediction depends on the prefix
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.mark.parametrize("guidance", [(None, None), (3.0, None), (3.0, 1.5)], ids=["unguided", "text", "text+image"])
def test_cached_editing_equals_full_recompute(model, guidance):
    src = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    instr = [[11, 12, 13], [14]]
    kw = dict(num_steps=4, text_guidance=guidance[0], image_guidance=guidance[1])
    a = model.edit_image(src, instr, 1, generator=torch.Generator().manual_seed(4), **kw)
    b = model.edit_image(src, instr, 1, generator=torch.Generator().manual_seed(4), use_cache=False, **kw)
    assert a.shape == (2, 4, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    other = model.edit_image(src.flip(-1), instr, 1, generator=torch.Generator().manual_seed(4), **kw)
    assert (other - a).abs().max() > 1e-3  # the source conditions the edit


def test_editing_argument_errors(model):
    src = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="2 source images but 1 instructions"):
        model.edit_image(src, [[5]], 1, num_steps=2, generator=torch.Generator())
    with pytest.raises(ValueError, match="image_guidance needs text_guidance"):
        model.edit_image(src, [[5], [6]], 1, num_steps=2, image_guidance=1.5, generator=torch.Generator())


def _triple(key, src, tgt, txt):
    out = {"__key__": key}
    if src is not None:
        out["src.png"] = src
    if tgt is not None:
        out["tgt.png"] = tgt
    if txt is not None:
        out["txt"] = txt
    return out


def test_precompute_edit_mode_counts_bad_triples_and_the_loader_reads_them(tmp_path):
    import webdataset as wds

    from megafusion.config import load_config
    from megafusion.data.latent_cache import CacheOptions, load_vae, process_shard
    from megafusion.data.stream import LoaderStream
    from megafusion.demo.shape_edits import triples
    from megafusion.demo.tokenizer import write_word_tokenizer

    good = list(triples(12, seed=1))
    (tmp_path / "in").mkdir()
    with wds.TarWriter(str(tmp_path / "in" / "edits-000000.tar")) as w:
        for s in good[:6]:
            w.write(s)
        w.write(_triple("bad0", good[0]["src.png"], None, "make it red"))  # missing target
        w.write(_triple("bad1", b"not a png", good[0]["tgt.png"], "make it red"))  # unreadable source
        w.write(_triple("bad2", good[0]["src.png"], good[0]["tgt.png"], None))  # no instruction
        for s in good[6:]:
            w.write(s)
    vae = load_vae(str(ROOT / "megafusion" / "assets" / "shapes_vae"), torch.device("cpu"))
    out = tmp_path / "lat" / "latents-000000.tar"
    out.parent.mkdir()
    rec = process_shard(vae, str(tmp_path / "in" / "edits-000000.tar"), out, CacheOptions(resolution=32, edit=True))
    assert rec["in"] == 15 and rec["out"] == 12
    assert {k: v for k, v in rec.items() if k.startswith("skipped/")} == {
        "skipped/missing_tgt": 1,
        "skipped/src:corrupt_image": 1,
        "skipped/missing_instruction": 1,
    }
    with tarfile.open(out) as t:
        names = t.getnames()
        src0 = np.load(io.BytesIO(t.extractfile(f"{good[0]['__key__']}.src.npy").read()))
    assert sum(n.endswith(".src.npy") for n in names) == 12 and sum(n.endswith(".tgt.npy") for n in names) == 12
    assert src0.shape == (4, 8, 8)
    words = "make it turn into a move to the red green blue yellow circle square triangle top bottom left right center"
    tok = write_word_tokenizer(tmp_path / "tok", words.split())
    cfg = load_config(
        "tiny",
        [
            f"data.path={out.parent}/latents-*.tar",
            f"data.tokenizer={tok}",
            "data.seq_length=80",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            "diffusion.edit_source_dropout=0.2",
        ],
    )
    stream = LoaderStream(cfg, 0, 1, torch.device("cpu"), 2)
    items, states = [], {}
    for step in range(8):
        items += [stream.item(step, m) for m in range(2)]
        states[step + 1] = json.dumps(stream.state_dict())
    sources = sum(int(it.batch.clean_images.sum()) for it in items if it.batch.clean_images is not None)
    assert sources > 0
    for it in items:
        c = it.batch.clean_images
        if c is not None:
            assert (it.batch.timesteps[c] == 0).all()
            assert it.batch.loss_mask.sum() == 0  # no LM loss on instructions by default
    resumed = LoaderStream(cfg, 0, 1, torch.device("cpu"), 2)
    resumed.load_state_dict([json.loads(states[3])], 3)
    for step in range(3, 8):
        for m in range(2):
            a, b = items[step * 2 + m].batch, resumed.item(step, m).batch
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.latents, b.latents)
            assert (a.clean_images is None) == (b.clean_images is None)


def test_checker_scores_the_bundled_edits():
    from PIL import Image

    from megafusion.demo.shape_edits import edits, score_edit, triples

    train, held = edits("train"), edits("held_out")
    assert len(train) + len(held) == 540 and 30 <= len(held) <= 80
    assert not {(tuple(s.values()), a, v) for s, a, v in train} & {(tuple(s.values()), a, v) for s, a, v in held}
    for s in triples(60, split="held_out", seed=2):
        meta = json.loads(s["json"])
        assert score_edit(meta["source"], s["txt"], Image.open(io.BytesIO(s["tgt.png"])))["correct"]
        assert not score_edit(meta["source"], s["txt"], Image.open(io.BytesIO(s["src.png"])))["correct"]


def test_edit_scores_per_type_from_the_pixels(tmp_path):
    """edit_scores on the true targets is all correct; on the unchanged sources nothing is edited, all is kept."""
    from PIL import Image

    from megafusion.demo.evaluation import edit_scores
    from megafusion.demo.shape_edits import parse_instruction

    recs = {"tgt": [], "src": []}
    for k, s in enumerate(triples_of_each_type()):
        meta = json.loads(s["json"])
        for which in recs:
            Image.open(io.BytesIO(s[f"{which}.png"])).save(tmp_path / f"{which}_{k}.png")
            recs[which].append(
                {"instruction": s["txt"], "source_attributes": meta["source"], "file": f"{which}_{k}.png"}
            )
    for which, want in (("tgt", (1.0, 1.0, 1.0)), ("src", (0.0, 0.0, 1.0))):
        d = tmp_path / which
        d.mkdir()
        for r in recs[which]:
            (d / r["file"]).write_bytes((tmp_path / r["file"]).read_bytes())
        (d / "samples.json").write_text(json.dumps({"edits": recs[which] + [{"instruction": "x", "file": "none"}]}))
        scores = edit_scores(d)
        kinds = {parse_instruction(r["instruction"])[0] for r in recs[which]}
        assert set(scores) == kinds | {"all"} and scores["all"]["n"] == len(recs[which])  # unlabelled record skipped
        for kind in scores:
            assert (scores[kind]["correct"], scores[kind]["edited"], scores[kind]["kept"]) == want


def triples_of_each_type():
    """Two held-out triples of each edit type."""
    from megafusion.demo.shape_edits import triples

    out, count = [], {}
    for s in triples(60, split="held_out", seed=5):
        attr = json.loads(s["json"])["attribute"]
        count[attr] = count.get(attr, 0) + 1
        if count[attr] <= 2:
            out.append(s)
    return out


def test_the_demo_tokenizer_gains_the_editing_words_without_changing_an_id(tmp_path):
    from transformers import AutoTokenizer

    from megafusion.demo.shape_edits import all_edits, instruction_for
    from megafusion.demo.tokenizer import EDIT_WORDS, shapes_vocabulary, write_word_tokenizer

    old = write_word_tokenizer(tmp_path / "tok", shapes_vocabulary())  # a run folder made before the editing words
    before = AutoTokenizer.from_pretrained(str(old)).get_vocab()
    write_word_tokenizer(tmp_path / "tok")
    after = AutoTokenizer.from_pretrained(str(old)).get_vocab()
    assert {w: after[w] for w in before} == before and set(after) - set(before) == set(EDIT_WORDS)
    tok = AutoTokenizer.from_pretrained(str(old))
    for _, attr, value in all_edits():
        assert tok.unk_token_id not in tok(instruction_for(attr, value))["input_ids"]
    other = write_word_tokenizer(tmp_path / "other", ["zebra"])  # not a prefix of the demo's words: kept as it is
    write_word_tokenizer(other)
    assert set(AutoTokenizer.from_pretrained(str(other)).get_vocab()) == {"<pad>", "<unk>", "<s>", "</s>", "zebra"}
