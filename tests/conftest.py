"""Shared fixtures. Triton kernels run under the interpreter when there is no CUDA device."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined (i.e. before kernels are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# Every test starts from the same random state, so a random draw cannot fail one CI run in fifteen.
# HF_EFFICIENT_TEST_SEED=<n> reruns the suite under another seed (to find tolerances that only hold by luck).
TEST_SEED = int(os.environ.get("HF_EFFICIENT_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed_everything():
    import random

    import numpy as np

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on the GPU machine with scripts/gpu.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: tiny models on a shared 2-core CPU run far slower when two
    OpenMP threads fight other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_llama():
    """A random-initialised 2-layer Llama (GQA, tied embeddings), fp32, eval mode, seed 0."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def embedded_path():
    """Path of the cached safetensors copy of the embedded SmolLM2-135M-Instruct (converted once)."""
    from hf_efficient.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_tokenizer):
    """A saved HF directory of a tiny random Llama with the embedded model's tokenizer (vocab 49152)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(embedded_tokenizer))).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    embedded_tokenizer.save_pretrained(d)
    return d
