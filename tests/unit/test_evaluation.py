"""tools/evaluate.py's scores on hand-made samples whose right answers are known."""

import json

import numpy as np
import pytest

from megafusion.demo.shapes import COLORS, POSITIONS, SHAPES, caption_for, draw_shape, parse_caption


def test_parse_caption_inverts_caption_for_and_refuses_ambiguity():
    for c in COLORS:
        for s in SHAPES:
            for p in POSITIONS:
                assert parse_caption(caption_for(c, s, p)) == {"color": c, "shape": s, "position": p}
    assert parse_caption("a red blue square") == {"color": "none", "shape": "square", "position": "none"}
    assert parse_caption("") == {"color": "none", "shape": "none", "position": "none"}


def _samples(tmp_path, drawn, captions):
    """A tools/sample.py-style folder: prompts with images drawn as `drawn` says, and captions."""
    images = []
    for i, (prompt, attrs) in enumerate(drawn):
        draw_shape(attrs["color"], attrs["shape"], attrs["position"], size=32).save(tmp_path / f"image_{i:03d}.png")
        images.append({"prompt": prompt, "index": i})
    rec = {"images": images, "captions": [{"image": k, "caption": v} for k, v in captions.items()], "text": []}
    (tmp_path / "samples.json").write_text(json.dumps(rec))


def test_scores_count_exactly_the_matching_attributes(tmp_path):
    from megafusion.demo.evaluation import caption_scores, generation_scores

    a = {"color": "red", "shape": "circle", "position": "top left"}
    b = {"color": "blue", "shape": "square", "position": "center"}
    wrong_colour = dict(a, color="green")
    wrong_all = {"color": "yellow", "shape": "triangle", "position": "bottom right"}
    drawn = [
        (caption_for(**a), a),
        (caption_for(**b), b),
        (caption_for(**a), wrong_colour),
        (caption_for(**b), wrong_all),
    ]
    captions = {"x.png": caption_for(**a), "y.png": "a blue circle in the center", "z.png": "nonsense"}
    _samples(tmp_path, drawn, captions)
    g = generation_scores(tmp_path)
    assert g == {"color": 0.5, "shape": 0.75, "position": 0.75, "all": 0.5, "n": 4}
    u = caption_scores(tmp_path, {"x.png": a, "y.png": b, "z.png": b})
    assert u["color"] == pytest.approx(2 / 3) and u["shape"] == pytest.approx(1 / 3)
    assert u["position"] == pytest.approx(2 / 3) and u["all"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no true attributes"):
        caption_scores(tmp_path, {"x.png": a})


def test_fusion_text_perplexity_equals_the_base_llamas(tmp_path):
    from megafusion import LlamaFusion
    from megafusion.config import load_config
    from megafusion.demo.base_lm import perplexity, text_corpus
    from megafusion.demo.evaluation import fusion_perplexity
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.demo.tokenizer import write_word_tokenizer

    cfg = load_config("tiny")
    hf = write_random_hf_llama(cfg.model, tmp_path / "hf", seed=3)
    tok_dir = write_word_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = text_corpus(20, seed=5)
    model = LlamaFusion.from_hf_llama(str(hf), image=cfg.model.image, boi_token_id=510, eoi_token_id=511)
    assert fusion_perplexity(model, tok, texts) == pytest.approx(perplexity(hf, tok_dir, texts), rel=1e-6)


def test_report_has_the_scores_and_a_loss_plot(tmp_path):
    from PIL import Image

    from megafusion.demo.report import write_report

    for name in ("llamafusion", "transfusion"):
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "metrics.jsonl").write_text(
            "\n".join(
                json.dumps({"step": s, "loss": 3.0 / s, "lm_loss": 2.0 / s, "diffusion_loss": 1.0 / s})
                for s in range(1, 9)
            )
        )
    metrics = {
        "llamafusion": {
            "generation": {"color": 0.9, "shape": 0.6, "position": 0.8, "all": 0.5, "n": 20},
            "language": {"base_perplexity": 2.5, "trained_perplexity": 2.5},
        },
        "transfusion": {
            "generation": {"color": 0.7, "shape": 0.4, "position": 0.85, "all": 0.25, "n": 20},
            "language": {"base_perplexity": 2.5, "trained_perplexity": 3.25},
        },
    }
    rep = write_report(tmp_path, metrics, {"train": 12.0})
    text = rep.read_text()
    assert "| score | llamafusion | transfusion |" in text
    assert "| generation color (n=20) | 0.900 | 0.700 |" in text
    assert "| text perplexity (base Llama 2.500000) | 2.500000 | 3.250000 |" in text
    plot = np.asarray(Image.open(tmp_path / "report" / "losses.png").convert("RGB"))
    assert plot.shape == (450, 800, 3) and "![training losses of every model](losses.png)" in text
    for name in ("llamafusion", "transfusion"):
        assert f"../{name}/samples/images.png" in text
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<tr><td>generation color (n=20)</td><td>0.900</td><td>0.700</td></tr>" in page
    assert "<img src='../llamafusion/samples/images.png'" in page and "<h2>Scores</h2>" in page
    write_report(tmp_path, metrics, {"train": 12.0}, log_scale=True)  # 3/s .. 1/s on a log axis: another picture
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "report" / "losses.png").convert("RGB")), plot)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["stage_seconds"] == {"train": 12.0} and saved["transfusion"]["language"]["trained_perplexity"] == 3.25
