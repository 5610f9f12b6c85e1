"""export_single: one LoRA for a token-level mixture (expected update, truncated by SVD) and its reported error."""

from __future__ import annotations

import json

import pytest
import torch

import molex
from molex.export import REPORT_NAME
from tests.helpers.hub import one_thread  # noqa: F401 - fixture
from tests.helpers.models import tiny_llama

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed: int = 0, count: int = 2):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 128, (3, 6), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 4:] = 0  # padding does not count
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def model_with(router: str, seed: int = 0, **options):
    model = tiny_llama()
    cfg = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=3, rank=2, router=router, **options)
    molex.inject(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.3)
    return model


def expected_update(layer, mean_gate):
    experts = layer.experts
    return sum(
        mean_gate[e] * experts.scaling[e] * experts.lora_B[e].t() @ experts.lora_A[e]
        for e in range(experts.num_experts)
    ).double()


def svd_error(delta, rank):
    S = torch.linalg.svdvals(delta)
    return (S[rank:].square().sum() / S.square().sum()).sqrt().item()


def test_full_rank_equals_a_constantly_routed_model(tmp_path):
    from peft import PeftModel

    model = model_with("soft")
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.router.gate.weight.zero_()  # softmax of zeros: every token 1/E on every expert
    result = molex.export_single(model, tmp_path / "single", batches(), rank=None)
    assert max(result.errors.values()) < 1e-6
    assert set(result.ranks.values()) == {6}  # three rank-2 experts
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(result.path)).eval()
    ids = torch.tensor([[5, 9, 22, 1, 7]])
    with torch.no_grad():
        diff = (peft_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_lower_rank_error_matches_a_direct_svd(tmp_path):
    model = model_with("topk", top_k=2)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.router.gate.weight.normal_(std=2.0)
    calibration = batches(seed=3, count=1)
    result = molex.export_single(model, tmp_path / "single", calibration, rank=3)
    # independently: the mean gate per expert over real tokens, from the layers' own routing statistics
    model.eval()
    with torch.no_grad():
        batch = calibration[0]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for name, layer in molex.mole_layers(model).items():
        delta = expected_update(layer, layer.routing_stats()["load"].double())
        assert result.ranks[name] == 3
        assert result.errors[name] == pytest.approx(svd_error(delta, 3), abs=1e-6)
        assert result.errors[name] > 1e-3  # rank 3 of a rank-6 update loses something
    report = json.loads((result.path / REPORT_NAME).read_text())
    assert report["relative_frobenius_error"] == pytest.approx(result.errors)
    assert report["mean_relative_frobenius_error"] == pytest.approx(result.mean_error)
    assert report["calibration_tokens"] == 3 * 6 - 2


def test_truncated_factors_give_the_best_rank_k_update(tmp_path):
    from safetensors.torch import load_file

    model = model_with("fixed", router_options={"weights": [0.5, -1.0, 2.0]})
    result = molex.export_single(model, tmp_path / "single", batches(), rank=2)
    tensors = load_file(str(result.path / "adapter_model.safetensors"))
    for name, layer in molex.mole_layers(model).items():
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        delta = expected_update(layer, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        U, S, Vh = torch.linalg.svd(delta)
        best = U[:, :2] * S[:2] @ Vh[:2]
        torch.testing.assert_close(B @ A, best, atol=1e-5, rtol=1e-5)


def test_bad_input(tmp_path):
    model = model_with("topk", top_k=2)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        molex.export_single(model, tmp_path / "x", batches(), rank=0)
    with pytest.raises(ValueError, match="no real tokens"):
        molex.export_single(model, tmp_path / "x", [], rank=2)
    fresh = tiny_llama()
    molex.inject(fresh, molex.MoLEConfig(target_modules=["q_proj"], num_experts=2, rank=2, router="topk", top_k=1))
    with pytest.raises(ValueError, match="zero in every layer"):
        molex.export_single(fresh, tmp_path / "x", batches(), rank=2)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        molex.export_single(model, tmp_path / "peft", batches(), rank=2)
