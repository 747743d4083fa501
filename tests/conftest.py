import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny random HF Llama (GQA 4/2 heads, llama3 rope scaling, vocab 300 not divisible by TP x 64)."""
    from tests.helpers import make_tiny_hf_llama

    return make_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny_llama")


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory):
    from tests.helpers import make_tiny_hf_llama

    return make_tiny_hf_llama(tmp_path_factory.mktemp("hf_tied") / "tiny_llama_tied", tie=True, seed=1)
