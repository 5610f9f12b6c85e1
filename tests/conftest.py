"""Shared fixtures: tiny random models built from configs (no downloads), dtype tolerances."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through its interpreter; triton reads this when first imported,
    # so it is set here, before any test module can import it. `auto` never picks triton on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers.models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def single_thread():
    """Run with one intra-op thread: on a shared, busy CPU, tiny models run up to 100x faster than with two
    threads spinning against each other. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
