"""tools/sample.py's input files: COCO-style prompt files (ids kept) and --edit lists, with clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sample_tool():
    spec = importlib.util.spec_from_file_location("sample_tool", ROOT / "tools" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prompt_files_coco_list_and_text(sample_tool, tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 7, "id": 70, "caption": "A red  circle\n at the top left"},
            {"image_id": 8, "id": 80, "caption": "a blue square"},
        ],
    }
    (tmp_path / "captions_val.json").write_text(json.dumps(coco))
    caps, ids = sample_tool._prompt_file(str(tmp_path / "captions_val.json"))
    assert caps == ["A red circle at the top left", "a blue square"]  # whitespace runs and newlines collapsed
    assert ids == [{"id": 70, "image_id": 7}, {"id": 80, "image_id": 8}]
    (tmp_path / "list.json").write_text(json.dumps([{"caption": "a green triangle", "image_id": 3}]))
    assert sample_tool._prompt_file(str(tmp_path / "list.json")) == (["a green triangle"], [{"image_id": 3}])
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    assert sample_tool._prompt_file(str(tmp_path / "p.txt")) == (["a red circle", "a blue square"], [{}, {}])


def test_prompt_file_errors_name_the_file_and_item(sample_tool, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"caption": "ok"}, {"image_id": 2}]}))
    with pytest.raises(ValueError, match=r"--prompts-file .*bad.json: item 1 has no \"caption\""):
        sample_tool._prompt_file(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not JSON"):
        sample_tool._prompt_file(str(bad))
    with pytest.raises(ValueError, match=r"missing.json"):
        sample_tool._prompt_file(str(tmp_path / "missing.json"))


def test_edit_lists_resolve_sources_beside_the_file_and_refuse_bad_items(sample_tool, tmp_path):
    f = tmp_path / "edits.json"
    f.write_text(
        json.dumps(
            [{"source": "a.png", "instruction": "make it red", "tag": 1}, {"source": "/x/b.png", "instruction": "x"}]
        )
    )
    items = sample_tool._edit_list(str(f))
    assert items[0] == {"source": str(tmp_path / "a.png"), "instruction": "make it red", "tag": 1}
    assert items[1]["source"] == "/x/b.png"
    f.write_text(json.dumps([{"source": "a.png"}]))
    with pytest.raises(ValueError, match=r"item 0 needs a \"source\" path and an \"instruction\" text"):
        sample_tool._edit_list(str(f))
    f.write_text("[]")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        sample_tool._edit_list(str(f))
