"""megafusion/console.py: exactly the known warnings are filtered; other ranks are silenced unless asked."""

from __future__ import annotations

import logging
import warnings

from megafusion.console import KNOWN, quiet_known_warnings, silence_other_ranks, torchrun_env


def _shown(action) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        action()
        for text, category in (
            ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning),
            ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning),
            ("something new went wrong", UserWarning),
        ):
            warnings.warn(text, category, stacklevel=1)
    return [str(w.message) for w in seen]


def test_known_warnings_are_filtered_and_others_still_show():
    note = []
    shown = _shown(lambda: note.append(quiet_known_warnings()))
    assert shown == ["something new went wrong"]
    assert f"{len(KNOWN)} known start-up warnings filtered" in note[0]


def test_other_ranks_are_silenced_unless_all_ranks():
    assert _shown(lambda: silence_other_ranks(0))[-1] == "something new went wrong"
    assert "something new went wrong" in _shown(lambda: silence_other_ranks(1, all_ranks=True))
    level = logging.getLogger("DeepSpeed").level
    try:
        assert _shown(lambda: silence_other_ranks(1)) == []
        assert logging.getLogger("DeepSpeed").level == logging.ERROR
    finally:
        logging.getLogger("DeepSpeed").setLevel(level)


def test_torchrun_env_sets_torchruns_own_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torchrun_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert torchrun_env()["OMP_NUM_THREADS"] == "4"
