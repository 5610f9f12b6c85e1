"""Hand-computed examples for every routing rule and auxiliary loss (small E, known logits)."""

from __future__ import annotations

import math

import pytest
import torch

from molex.core.losses import contrastive_loss, expert_outputs, gate_cross_entropy, tsallis_entropy
from molex.layer.context import RoutingContext
from molex.routers import SwitchRouter, build_router
from molex.routers.dlp import top_p_inclusive


def identity_gate(router, num_experts: int) -> None:
    """Make ``router.gate(x) == x`` so that tests choose the logits directly."""
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def masked_context(mask: list[list[int]]) -> RoutingContext:
    attention = torch.tensor(mask)
    return RoutingContext(attention_mask=attention, batch_size=attention.shape[0], seq_len=attention.shape[1])


def reference_tsallis(p: list[float], q: float, eps: float) -> float:
    num = len(p)
    s_q = (1.0 - sum((x + eps) ** q for x in p)) / (q - 1.0)
    return s_q / ((1.0 - num ** (1.0 - q)) / (q - 1.0))


# ---------------------------------------------------------------- entropy and losses


def test_tsallis_matches_formula_and_q2_closed_form():
    p = [0.5, 0.25, 0.15, 0.1]
    got = tsallis_entropy(torch.tensor([p]), q=1.1, eps=1e-5).item()
    assert got == pytest.approx(reference_tsallis(p, 1.1, 1e-5), abs=1e-6)
    # q = 2: (1 - sum p^2) / (1 - 1/E)
    expected = (1 - sum(x * x for x in p)) / (1 - 1 / 4)
    assert tsallis_entropy(torch.tensor([p]), q=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert tsallis_entropy(torch.full((1, 4), 0.25), q=1.1).item() == pytest.approx(1.0, abs=1e-6)
    assert tsallis_entropy(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), q=1.1).item() == pytest.approx(0.0, abs=1e-6)


def test_tsallis_q_to_one_is_shannon_over_log_e():
    p = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    shannon = -(p * p.log()).sum().item() / math.log(4)
    assert tsallis_entropy(p, q=1.0).item() == pytest.approx(shannon, abs=1e-6)
    for q in (1 + 1e-4, 1 - 1e-4, 1 + 1e-7):  # continuous through the limit, no cancellation
        assert tsallis_entropy(p, q=q).item() == pytest.approx(shannon, abs=2e-4)
    assert tsallis_entropy(torch.ones(1, 1), q=1.1).item() == 0.0  # one expert: no uncertainty
    with pytest.raises(ValueError, match="q > 0"):
        tsallis_entropy(p, q=0.0)


def test_gate_cross_entropy_ignores_padding_and_negative_targets():
    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, 3.0]])
    targets = torch.tensor([0, 1, -100])
    mask = torch.tensor([True, False, True])
    # only token 0 counts: CE of uniform logits over 2 classes = log 2
    assert gate_cross_entropy(logits, targets, mask).item() == pytest.approx(math.log(2), abs=1e-6)
    assert gate_cross_entropy(logits, torch.full((3,), -100)).item() == 0.0


def test_contrastive_loss_orthogonal_experts_and_padding():
    tau = 0.5
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]], [[0.0, 9.0], [9.0, 0.0]]])
    mask = torch.tensor([True, True, False])  # the swapped third token is padding: must not count
    expected = math.log(1 + math.exp(-1 / tau))  # anchor sim 1 with own prototype, 0 with the other
    assert contrastive_loss(out, mask, temperature=tau).item() == pytest.approx(expected, abs=1e-6)
    assert contrastive_loss(out[:, :1], mask).item() == 0.0
    # expert_outputs: every expert's scaled LoRA output
    x, A, B = torch.randn(3, 4), torch.randn(2, 2, 4), torch.randn(2, 2, 5)
    want = torch.stack([0.5 * (x @ A[0].t()) @ B[0], 2.0 * (x @ A[1].t()) @ B[1]], dim=1)
    torch.testing.assert_close(expert_outputs(x, A, B, torch.tensor([0.5, 2.0])), want)


# ---------------------------------------------------------------- dynmole


def dynmole(num_experts: int = 4, **options):
    router = build_router("dynmole", in_features=num_experts, num_experts=num_experts, **options)
    identity_gate(router, num_experts)
    return router


def kept(decision) -> list[list[tuple[int, float]]]:
    return [
        [(int(i), round(float(w), 6)) for i, w in zip(row_i, row_w, strict=True) if w > 0]
        for row_i, row_w in zip(decision.indices, decision.weights.detach(), strict=True)
    ]


def test_dynmole_top_p_excludes_the_crossing_expert_and_does_not_renormalise():
    x = logits_of([[0.1, 0.5, 0.3, 0.1]])  # sorted 0.5, 0.3, 0.1, 0.1; cumsum 0.5, 0.8, ...
    decision = dynmole(tau=1.0, top_p=0.75, keep_top_k=1)(x)
    assert kept(decision) == [[(1, 0.5)]]  # 0.3 crosses 0.75: excluded
    assert decision.indices.shape == (1, 4) and sorted(decision.indices[0].tolist()) == [0, 1, 2, 3]
    # within keep_top_k the crossing expert stays, weights still the raw probabilities
    assert kept(dynmole(tau=1.0, top_p=0.75, keep_top_k=2)(x)) == [[(1, 0.5), (2, 0.3)]]


def test_dynmole_exact_boundary_is_kept():
    x = logits_of([[0.15, 0.5, 0.1, 0.25]])  # cumsum reaches exactly 0.75 with the second expert
    assert kept(dynmole(tau=1.0, top_p=0.75, keep_top_k=1)(x)) == [[(1, 0.5), (3, 0.25)]]


def test_dynmole_tau_switches_to_all_experts():
    p = [0.3, 0.25, 0.25, 0.2]
    h = reference_tsallis(p, 1.1, 1e-5)
    assert 0.9 < h < 1.0
    x = logits_of([p])
    assert kept(dynmole(tau=0.9)(x)) == [[(0, 0.3), (1, 0.25), (2, 0.25), (3, 0.2)]]  # H > tau: soft
    assert kept(dynmole(tau=h + 1e-3, top_p=0.6, keep_top_k=1)(x)) == [[(0, 0.3), (1, 0.25)]]  # H <= tau: top-p
    # per token: a confident token and an uncertain one in one batch
    both = logits_of([p, [0.9, 0.05, 0.03, 0.02]])
    assert kept(dynmole(tau=0.9, keep_top_k=1)(both))[1] == [(0, 0.9)]


def test_dynmole_losses_by_hand_with_padding():
    p0, p1 = [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]
    x = logits_of([p0, p1, [0.97, 0.01, 0.01, 0.01]])
    context = masked_context([[1, 1, 0]])  # third token is padding
    router = dynmole(tau=0.9, top_p=0.75, keep_top_k=1, entropy_coef=0.5, load_balance_coef=2.0)
    decision = router(x, context)
    h0, h1 = reference_tsallis(p0, 1.1, 1e-5), reference_tsallis(p1, 1.1, 1e-5)
    assert decision.aux_losses["entropy"].item() == pytest.approx(0.5 * (h0 + h1) / 2, abs=1e-5)
    # token 0 keeps expert 0 (0.7 crosses 0.75? no: cumsum 0.7, 0.8 -> keep only expert 0); token 1 is soft
    f = [(0.7 + 0.25) / 2, 0.25 / 2, 0.25 / 2, 0.25 / 2]  # mean kept weight per expert over real tokens
    mean_p = [(a + b) / 2 for a, b in zip(p0, p1, strict=True)]
    lb = 4 * sum(fe * pe for fe, pe in zip(f, mean_p, strict=True))
    assert decision.aux_losses["load_balance"].item() == pytest.approx(2.0 * lb, abs=1e-5)


# ---------------------------------------------------------------- dlp top-p


def test_dlp_top_p_includes_the_crossing_expert_softmax_weights():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    indices, weights, keep = top_p_inclusive(probs, 0.75)  # 0.3 crosses 0.75: included (DynMoLE: excluded)
    assert indices[0, :2].tolist() == [1, 2] and keep[0].tolist() == [True, True, False, False]
    e5, e3 = math.exp(0.5), math.exp(0.3)
    torch.testing.assert_close(weights[0], torch.tensor([e5 / (e5 + e3), e3 / (e5 + e3), 0.0, 0.0]))
    # exact boundary: 0.5 + 0.25 reaches 0.75, nothing after it is needed
    _, _, keep = top_p_inclusive(torch.tensor([[0.15, 0.5, 0.1, 0.25]]), 0.75)
    assert keep[0].tolist() == [True, True, False, False]
    _, weights, keep = top_p_inclusive(torch.tensor([[0.9, 0.05, 0.05]]), 0.5)  # the first always stays
    assert keep[0].tolist() == [True, False, False] and weights[0, 0].item() == 1.0


def test_dlp_standalone_decision_from_one_sequence():
    router = build_router("dlp", in_features=6, num_experts=3, top_p=1.0, dropout=0.0)
    x = torch.randn(5, 6)
    decision = router(x)
    probs = router.classifier(x.mean(0, keepdim=True)).softmax(-1)
    assert decision.is_per_sequence and decision.tokens_per_sequence == 5
    torch.testing.assert_close(decision.probs, probs)
    order = probs[0].argsort(descending=True)
    torch.testing.assert_close(decision.weights[0], probs[0][order].softmax(-1))  # top_p=1: all, softmax of p


# ---------------------------------------------------------------- gate (MeteoRA)


def test_gate_softmax_of_topk_logits_with_temperature():
    router = build_router("gate", in_features=4, num_experts=4, top_k=2, temperature=0.5)
    identity_gate(router, 4)
    decision = router(torch.tensor([[2.0, 1.0, 0.5, -1.0]]))
    assert decision.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(decision.weights, torch.tensor([[4.0, 2.0]]).softmax(-1))


def test_gate_task_loss_per_sequence_and_per_token_ids():
    router = build_router("gate", in_features=2, num_experts=2, top_k=1, task_loss_coef=50.0)
    identity_gate(router, 2)
    x = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    context = masked_context([[1, 1], [1, 0]])  # token 3 is padding
    context.inputs = {"task_ids": torch.tensor([0, 1])}  # one task per sequence
    ce = torch.nn.functional.cross_entropy(x[:3], torch.tensor([0, 0, 1]))
    assert router(x, context).aux_losses["task_ce"].item() == pytest.approx(50 * ce.item(), abs=1e-4)
    context.inputs = {"task_ids": torch.tensor([[1, -100], [1, 1]])}  # per token, -100 ignored
    ce = torch.nn.functional.cross_entropy(x[[0, 2]], torch.tensor([1, 1]))
    assert router(x, context).aux_losses["task_ce"].item() == pytest.approx(50 * ce.item(), abs=1e-4)


def test_gate_task_loss_needs_task_ids_while_training():
    router = build_router("gate", in_features=2, num_experts=2, top_k=1, task_loss_coef=1.0).train()
    with pytest.raises(ValueError, match=r"needs `task_ids`.*routing_inputs"):
        router(torch.randn(4, 2), masked_context([[1, 1], [1, 1]]))
    assert "task_ce" not in router.eval()(torch.randn(4, 2), masked_context([[1, 1], [1, 1]])).aux_losses


# ---------------------------------------------------------------- switch


def switch(**options):
    router = build_router("switch", in_features=2, num_experts=2, **options)
    identity_gate(router, 2)
    return router


def test_switch_top1_weight_is_the_probability():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    decision = switch()(x)
    assert decision.indices.tolist() == [[0], [1]]
    torch.testing.assert_close(decision.weights[:, 0], torch.stack([x[0].softmax(-1)[0], x[1].softmax(-1)[1]]))


def test_switch_capacity_drops_overflow_in_token_order():
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[1.0, 0.0]])  # experts 0, 0, 0, 1, 0
    decision = switch(capacity_factor=1.0)(x)  # capacity ceil(5 / 2) = 3: the 4th token of expert 0 overflows
    assert (decision.weights[:, 0] > 0).tolist() == [True, True, True, True, False]
    assert SwitchRouter.dropped_fraction(decision).item() == pytest.approx(1 / 5)
    # padding takes no capacity: 4 real tokens -> capacity 2; expert 0 gets real tokens 0, 2, 4
    decision = switch(capacity_factor=1.0)(x, masked_context([[1, 0, 1, 1, 1]]))
    assert (decision.weights[:, 0] > 0).tolist() == [True, True, True, True, False]
    assert SwitchRouter.dropped_fraction(decision).item() == pytest.approx(1 / 4)
    assert SwitchRouter.dropped_fraction(switch()(x)).item() == 0.0  # None = unlimited


def test_switch_load_balance_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    decision = switch(load_balance_coef=1.0)(x)
    p = x.softmax(-1)
    expected = 2 * ((2 / 3) * p[:, 0].mean() + (1 / 3) * p[:, 1].mean())
    assert decision.aux_losses["load_balance"].item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------- milora (standalone)


def test_milora_pools_prompt_tokens_and_keeps_top_k_modules():
    router = build_router("milora", in_features=3, num_experts=3, top_k=2)
    identity_gate(router, 3)
    x = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 2.0], [0.0, 0.0, 9.0], [5.0, 5.0, 5.0]])
    context = masked_context([[1, 1], [1, 0]])  # sequence 1: its second token is padding
    context.inputs = {"prompt_mask": torch.tensor([[1, 1], [0, 1]])}  # ... and its first is not prompt
    decision = router(x, context)
    assert decision.tokens_per_sequence == 2 and decision.indices.shape == (2, 2)
    p0 = torch.tensor([2.0, 0.0, 1.0]).softmax(-1)  # mean of tokens 0, 1
    assert decision.indices[0].tolist() == [0, 2]
    torch.testing.assert_close(decision.weights[0], p0[[0, 2]])  # not renormalised by default
    # sequence 1 has no prompt token left: the pooled vector is zero -> uniform probabilities
    torch.testing.assert_close(decision.weights[1], torch.full((2,), 1 / 3))
    normalized = build_router("milora", in_features=3, num_experts=3, top_k=2, normalize=True)
    identity_gate(normalized, 3)
    torch.testing.assert_close(normalized(x, context).weights[0], p0[[0, 2]] / p0[[0, 2]].sum())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("dynmole", {"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ("dynmole", {"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
        ("dynmole", {"q": 0.0}, "q must be > 0"),
        ("dynmole", {"tau": 1.5}, "tau must be in \\[0, 1\\]"),
        ("dynmole", {"keep_top_k": 5}, "keep_top_k=5 exceeds num_experts=4"),
        ("dynmole", {"contrastive_temperature": 0.0}, "contrastive_temperature must be > 0"),
        ("dlp", {"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ("dlp", {"embedding_source": "bert"}, "embedding_source must be one of"),
        ("dlp", {"classifier_hidden": 1_000_000}, "lower classifier_hidden"),
        ("gate", {"top_k": 5}, "top_k=5 exceeds num_experts=4"),
        ("gate", {"temperature": 0.0}, "temperature must be > 0"),
        ("switch", {"capacity_factor": 0.0}, "capacity_factor must be > 0 or None"),
        ("milora", {"top_k": 5}, "top_k=5 exceeds the 4 MoLE modules"),
        ("dynmole", {"top_pp": 0.5}, "unknown option.*top_pp.*valid options.*top_p"),
        ("milora", {"capacity": 1}, "unknown option.*valid options.*top_k"),
    ],
)
def test_bad_options_fail_clearly(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_router(name, in_features=4, num_experts=4, **options)


def test_switch_dropped_fraction_in_layer_routing_stats():
    from molex.layer.experts import LoRAExperts
    from molex.layer.linear import MoLELinear

    router = switch(capacity_factor=1.0)
    experts = LoRAExperts(in_features=2, out_features=3, num_experts=2, rank=1, scaling=1.0)
    layer = MoLELinear(torch.nn.Linear(2, 3), experts=experts, router=router)
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[1.0, 0.0]])
    with torch.no_grad():
        experts.lora_B.normal_()
        out = layer(x)
        base = layer.base_layer(x)
    assert torch.equal(out[4], base[4])  # the overflow token gets only the base output
    assert not torch.equal(out[0], base[0])
    assert layer.routing_stats()["dropped"].item() == pytest.approx(1 / 5)
