"""The ``arrow`` router: exact prototypes, PEFT 0.21 parity (with and without GenKnowSub), options."""

from __future__ import annotations

import pytest
import torch

import molex
from molex.routers.arrow import arrow_prototypes
from tests.helpers.models import tiny_llama as shared_tiny_llama


def tiny_llama(num_layers: int = 2, seed: int = 0):
    """The tiny random llama of the test suite (built from a config, no download)."""
    return shared_tiny_llama(num_layers=num_layers, seed=seed)


def make_peft_adapter(directory, *, seed: int, **lora_options):
    """A PEFT LoRA with random non-zero factors on the tiny llama, saved to ``directory``."""
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    options.update(lora_options)
    model = tiny_llama(num_layers=2)  # seeds torch itself: the adapter's seed comes after
    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(**options)).save_pretrained(str(directory))
    return str(directory)


def test_exact_prototype_is_top_right_singular_vector_of_dense_product():
    torch.manual_seed(0)
    A, B = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 4, 12, dtype=torch.float64)
    protos = arrow_prototypes(A, B)
    for e in range(3):
        dense = B[e].T @ A[e]  # [out, in]
        top = torch.linalg.svd(dense).Vh[0]
        assert torch.allclose(protos[e].double().abs(), top.abs(), atol=1e-6)
        assert abs(float(protos[e].double() @ top)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("use_gks", [False, True])
def test_matches_peft_arrow(tmp_path, use_gks):
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import create_arrow_model

    tasks = {f"t{i}": make_peft_adapter(tmp_path / f"t{i}", seed=10 + i) for i in range(4)}
    general = {f"g{i}": make_peft_adapter(tmp_path / f"g{i}", seed=50 + i) for i in range(2)} if use_gks else None
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    config = ArrowConfig(top_k=2, router_temperature=0.7, use_gks=use_gks, rng_seed=3)
    reference = create_arrow_model(
        tiny_llama(num_layers=2), list(tasks.values()), config, list(general.values()) if general else None
    ).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    fused = molex.fuse_adapters(
        tiny_llama(num_layers=2),
        tasks,
        router="arrow",
        top_k=2,
        temperature=0.7,
        power_iterations=15,
        rng_seed=3,
        general_adapters=general,
    ).eval()
    with torch.no_grad():
        actual = fused(input_ids=ids).logits
    base = tiny_llama(num_layers=2).eval()(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapters do change the output
    diff = (actual - expected).abs().max().item()
    print(f"arrow parity use_gks={use_gks}: max |molex - peft| = {diff:.3g}")
    assert diff < 1e-5


def test_has_no_parameters_and_rejects_bad_options(tmp_path):
    tasks = {f"t{i}": make_peft_adapter(tmp_path / f"t{i}", seed=i) for i in range(3)}
    fused = molex.fuse_adapters(tiny_llama(num_layers=2), tasks, router="arrow", top_k=2)
    assert molex.trainable_parameters(fused) == []
    with pytest.raises(ValueError, match="temperature"):
        molex.build_router("arrow", in_features=8, num_experts=3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        molex.build_router("arrow", in_features=8, num_experts=3, top_k=4)
