"""Build small PEFT adapters with peft itself, for the hub tests."""

from __future__ import annotations

import pytest
import torch


def make_peft_adapter(factory, directory, *, seed: int, safe: bool = True, **lora_options):
    """Train-free PEFT LoRA adapter with random non-zero factors on ``factory()``; saved to ``directory``.

    Returns the ``PeftModel`` (for reference outputs).
    """
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    options.update(lora_options)
    model = factory()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**options))
    peft_model.save_pretrained(str(directory), safe_serialization=safe)
    return peft_model.eval()


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, OpenMP spin contention makes two threads far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
