"""AdaMix (``stochastic`` router): uniform random experts while training, the averaged LoRA at inference,
the consistency loss between two stochastic passes, and the averaged LoRA as a PEFT adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import molex
from molex.hub import export_average_adapter
from molex.layer.context import RoutingContext
from molex.layer.experts import LoRAExperts
from molex.layer.linear import MoLELinear
from molex.routers import average_experts, build_router
from molex.training.consistency import symmetric_kl
from molex.training.objective import mole_objective
from tests.helpers.models import tiny_llama

#: chi-square critical value for 3 degrees of freedom at p = 0.001
CHI2_3DOF_P001 = 16.27


def stochastic_layer(dtype=torch.float32, backend: str = "dense", **options) -> MoLELinear:
    torch.manual_seed(0)
    base = nn.Linear(8, 5).to(dtype)
    pool = LoRAExperts(in_features=8, out_features=5, num_experts=4, rank=3, scaling=2.0).to(dtype)
    with torch.no_grad():
        pool.lora_B.normal_()
    router = build_router("stochastic", in_features=8, num_experts=4, **options)
    return MoLELinear(base, experts=pool, router=router, kernel_backend=backend)


def test_eval_output_is_exactly_the_averaged_lora():
    layer = stochastic_layer().eval()
    x = torch.randn(6, 8)
    A, B = layer.experts.lora_A.mean(0), layer.experts.lora_B.mean(0)  # [r, in], [r, out]
    expected = layer.base_layer(x) + ((x @ A.t()) * 2.0) @ B
    assert torch.equal(layer(x), expected)


def test_eval_output_matches_the_averaged_lora_in_float64_with_any_backend():
    layer = stochastic_layer(torch.float64, backend="auto").eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    A, B = layer.experts.lora_A.mean(0), layer.experts.lora_B.mean(0)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ A.t()) @ B, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_training_choices_are_uniform(level):
    router = build_router("stochastic", in_features=8, num_experts=4, level=level).train()
    batch, seq = (4000, 1) if level == "sequence" else (1, 4000)
    context = RoutingContext(batch_size=batch, seq_len=seq)
    torch.manual_seed(123)
    decision = router(torch.randn(batch * seq, 8), context)
    assert decision.top_k == 1 and bool((decision.weights == 1).all())
    assert decision.is_per_sequence == (level == "sequence")
    counts = torch.bincount(decision.indices.reshape(-1), minlength=4).double()
    expected = counts.sum() / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_3DOF_P001, counts.tolist()
    torch.manual_seed(123)
    assert torch.equal(router(torch.randn(batch * seq, 8), context).indices, decision.indices)  # reproducible


def test_training_uses_one_expert_per_token():
    layer = stochastic_layer().train()
    x = torch.randn(10, 8)
    torch.manual_seed(5)
    out = layer(x)
    chosen = layer.last_decision.indices[:, 0]
    A, B = layer.experts.lora_A, layer.experts.lora_B
    expected = torch.stack([(x[t] @ A[e].t()) @ B[e] for t, e in enumerate(chosen.tolist())]) * 2.0
    torch.testing.assert_close(out, layer.base_layer(x) + expected)


def test_sequence_level_needs_the_batch_layout_and_options_are_checked():
    router = build_router("stochastic", in_features=8, num_experts=4, level="sequence").train()
    with pytest.raises(ValueError, match="level='token'"):
        router(torch.randn(6, 8))
    with pytest.raises(ValueError, match="level must be one of"):
        build_router("stochastic", in_features=8, num_experts=4, level="layer")
    with pytest.raises(ValueError, match="consistency_coef"):
        build_router("stochastic", in_features=8, num_experts=4, consistency_coef=-1.0)


def test_averaging_needs_one_scaling():
    pool = LoRAExperts(in_features=8, out_features=5, num_experts=2, rank=3, scaling=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="different scalings"):
        average_experts(pool)


def test_symmetric_kl_equals_a_hand_computation():
    p_logits = torch.tensor([[[0.2, -1.0, 0.5], [1.0, 0.0, 0.0]], [[0.0, 0.0, 3.0], [2.0, 1.0, -1.0]]])
    q_logits = torch.tensor([[[0.0, 0.3, 0.1], [0.5, 0.5, 0.0]], [[1.0, 0.0, 0.0], [-2.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True], [False, True]])
    total = 0.0
    for b, s in [(0, 0), (0, 1), (1, 1)]:
        p = [float(v) for v in torch.softmax(p_logits[b, s].double(), -1)]
        q = [float(v) for v in torch.softmax(q_logits[b, s].double(), -1)]
        total += sum(
            pi * torch.log(torch.tensor(pi / qi)).item() + qi * torch.log(torch.tensor(qi / pi)).item()
            for pi, qi in zip(p, q, strict=True)
        )
    assert symmetric_kl(p_logits, q_logits, mask).item() == pytest.approx(total / 3, rel=1e-5)
    assert symmetric_kl(p_logits, p_logits).item() == pytest.approx(0.0, abs=1e-7)


def test_consistency_term_of_the_objective():
    model = tiny_llama(num_layers=2)
    options = {"consistency_coef": 0.5}
    molex.inject(
        model,
        molex.MoLEConfig(
            target_modules=["q_proj", "v_proj"], num_experts=3, router="stochastic", router_options=options
        ),
    )
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.5)
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    model.train()
    second = []

    def rerun():
        second.append(model(input_ids=ids, attention_mask=mask))
        return second[-1]

    first = model(input_ids=ids, attention_mask=mask, labels=ids)
    loss = mole_objective(model, first, rerun=rerun)
    expected = 0.5 * symmetric_kl(first.logits, second[0].logits, mask.bool())
    assert expected > 0 and torch.equal(loss.extra["consistency"], expected)
    torch.testing.assert_close(loss.total, first.loss + expected)
    loss.total.backward()
    model.eval()
    assert "consistency" not in mole_objective(model, model(input_ids=ids, labels=ids), rerun=rerun).extra


def test_averaged_lora_exports_as_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama(num_layers=2)
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="stochastic"))
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.2)
    model.eval()
    export_average_adapter(model, tmp_path)
    served = peft.PeftModel.from_pretrained(tiny_llama(num_layers=2), tmp_path).eval()
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(served(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, tiny_llama(num_layers=2)(input_ids=ids).logits)  # the LoRA matters


def test_export_refuses_other_routers(tmp_path):
    model = molex.inject(tiny_llama(num_layers=1), molex.MoLEConfig(target_modules=["q_proj"], num_experts=2))
    with pytest.raises(ValueError, match="'stochastic'"):
        export_average_adapter(model, tmp_path)
