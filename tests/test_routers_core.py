"""Router contract, registry, and the token-level topk / soft routers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molex.layer.context import RoutingContext
from molex.routers import RoutingDecision, available_routers, build_router

#: topk's gate on the raw input at temperature 1, so that set_gate's logits are the router's logits
RAW_GATE = {"input_norm": "none", "temperature": 1.0}


def set_gate(router, logits_per_token):
    """Make router.gate produce the given logits for one-hot inputs (``RAW_GATE`` for topk)."""
    with torch.no_grad():
        router.gate.weight.copy_(torch.as_tensor(logits_per_token, dtype=torch.float32).t())


def test_registry_lists_and_rejects():
    assert {"topk", "soft"} <= set(available_routers())
    with pytest.raises(ValueError, match=r"unknown router 'nope'; known routers: .*soft.*topk"):
        build_router("nope", in_features=4, num_experts=2)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topk'\] for router 'topk'; valid options: .*top_k"):
        build_router("topk", in_features=4, num_experts=2, topk=1)
    with pytest.raises(ValueError, match="top_k=3 exceeds num_experts=2"):
        build_router("topk", in_features=4, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        build_router("topk", in_features=4, num_experts=2, top_k=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_router("soft", in_features=4, num_experts=2, temperature=0)


@pytest.mark.parametrize("share", ["slots", "weight"])
def test_topk_hand_computed(share):
    router = build_router(
        "topk",
        in_features=3,
        num_experts=3,
        top_k=2,
        load_balance_coef=1.0,
        z_loss_coef=1.0,
        balance_share=share,
        **RAW_GATE,
    )
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.0, 3.0], [1.0, 2.0, 0.5]])  # token t = one-hot t
    set_gate(router, logits)
    decision = router(torch.eye(3))
    probs = logits.softmax(-1)
    assert decision.indices.tolist() == [[0, 1], [2, 0], [1, 0]]
    kept = probs.gather(1, decision.indices)
    torch.testing.assert_close(decision.weights, kept / kept.sum(-1, keepdim=True))
    # load balance E * sum_e f_e P_e, f_e = share of the 6 routed slots, or of the routed weight
    if share == "slots":
        fractions = torch.bincount(decision.indices.flatten(), minlength=3).float() / 6
    else:
        fractions = torch.zeros(3).index_add_(0, decision.indices.flatten(), decision.weights.flatten()) / 3
    expected_lb = 3 * (fractions * probs.mean(0)).sum() - (1.0 if share == "weight" else 0.0)  # weight: excess over 1
    torch.testing.assert_close(decision.aux_losses["load_balance"], expected_lb)
    torch.testing.assert_close(decision.aux_losses["z_loss"], torch.logsumexp(logits, -1).square().mean())
    dense = decision.to_dense(3)
    assert dense.shape == (3, 3)
    torch.testing.assert_close(dense.sum(-1), torch.ones(3))


def test_weight_share_keeps_balancing_when_every_token_keeps_every_expert():
    """top_k = E: every expert fills every token's slots, so the slot-share loss is a constant (no gradient
    toward balance) while the weight-share loss still pushes the favoured expert's logit down."""
    grads = {}
    for share in ("slots", "weight"):
        router = build_router(
            "topk", in_features=2, num_experts=2, top_k=2, load_balance_coef=1.0, balance_share=share, **RAW_GATE
        )
        set_gate(router, torch.tensor([[3.0, 0.0], [2.0, 0.0]]))
        router(torch.eye(2)).aux_losses["load_balance"].backward()
        grads[share] = router.gate.weight.grad.clone()
    torch.testing.assert_close(grads["slots"], torch.zeros(2, 2))
    assert (grads["weight"][0] > 0).all() and (grads["weight"][1] < 0).all()  # expert 0 is pushed down


def test_bad_balance_share_names_the_value():
    with pytest.raises(ValueError, match="balance_share='count'.*weight, slots"):
        build_router("topk", in_features=2, num_experts=2, balance_share="count")


def test_padding_never_counts_in_losses():
    router = build_router("topk", in_features=4, num_experts=4, top_k=1, load_balance_coef=1.0, z_loss_coef=1.0)
    x = torch.randn(2, 3, 4)
    ctx = RoutingContext(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), batch_size=2, seq_len=3)
    with_pad = router(x.reshape(-1, 4), ctx)
    keep = torch.tensor([0, 1, 3, 4, 5])
    without = router(x.reshape(-1, 4)[keep])
    for key in ("load_balance", "z_loss"):
        torch.testing.assert_close(with_pad.aux_losses[key], without.aux_losses[key])
    # changing the padded token changes nothing
    x2 = x.clone()
    x2[0, 2] = 100.0
    again = router(x2.reshape(-1, 4), ctx)
    for key in ("load_balance", "z_loss"):
        torch.testing.assert_close(with_pad.aux_losses[key], again.aux_losses[key])


def test_soft_router_temperature():
    router = build_router("soft", in_features=2, num_experts=2, temperature=0.5)
    set_gate(router, [[1.0, 0.0], [0.0, 1.0]])
    decision = router(torch.eye(2))
    torch.testing.assert_close(decision.weights[0], torch.tensor([1.0, 0.0]).div(0.5).softmax(-1))
    assert decision.indices.tolist() == [[0, 1], [0, 1]]


def test_jitter_only_in_training():
    router = build_router("topk", in_features=8, num_experts=4, top_k=2, jitter_noise=0.5)
    x = torch.randn(64, 8)
    router.eval()
    torch.testing.assert_close(router(x).weights, router(x).weights)
    router.train()
    torch.manual_seed(0)
    a = router(x).weights
    torch.manual_seed(1)
    b = router(x).weights
    assert not torch.allclose(a, b)


def test_gradients_reach_the_gate():
    router = build_router("topk", in_features=6, num_experts=4, top_k=2)
    decision = router(torch.randn(10, 6))
    (decision.weights * torch.randn(10, 2)).sum().add(decision.aux_losses["load_balance"]).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_decision_validates_shapes():
    with pytest.raises(ValueError, match="one shape"):
        RoutingDecision(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1))


logit_scale = st.sampled_from([1e-3, 1.0, 30.0, 1e4])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["topk", "soft"]),
    num_experts=st.integers(1, 9),
    k=st.integers(1, 9),
    tokens=st.integers(0, 17),
    scale=logit_scale,
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_router_properties(name, num_experts, k, tokens, scale, bf16, seed):
    k = min(k, num_experts)
    options = {"top_k": k} if name == "topk" else {}
    torch.manual_seed(seed)
    router = build_router(name, in_features=5, num_experts=num_experts, **options)
    x = torch.randn(tokens, 5) * scale
    if bf16:
        x = x.bfloat16()
    decision = router(x)
    idx, w = decision.indices, decision.weights
    assert idx.shape == w.shape == (tokens, k if name == "topk" else num_experts)
    assert w.dtype == torch.float32
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert ((idx >= 0) & (idx < num_experts)).all()
    if tokens:
        assert all(len(set(row)) == len(row) for row in idx.tolist())  # distinct
        torch.testing.assert_close(w.sum(-1), torch.ones(tokens), atol=1e-5, rtol=0)
    for loss in decision.aux_losses.values():
        assert torch.isfinite(loss)
    assert not math.isnan(float(decision.to_dense(num_experts).detach().sum()))


def test_router_input_is_scale_free_and_tames_a_massive_channel():
    from molex.routers.base import router_input

    torch.manual_seed(0)
    x = torch.randn(64, 64, dtype=torch.float64)
    x[:, 0] += 12.0  # one "massive" channel, the same in every token: 70% of the energy, as in SmolLM2's deeper layers
    for norm in ("l2", "log"):
        out = router_input(x, norm)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(64))
        torch.testing.assert_close(router_input(1000.0 * x, norm), out)  # only the direction counts
    torch.testing.assert_close(router_input(x, "none"), x.float())

    def mean_cosine(u):
        return float((u @ u.T).mean())

    assert mean_cosine(router_input(x, "l2")) > 0.65  # raw directions: tokens look alike
    assert mean_cosine(router_input(x, "log")) < 0.3  # compressed: they differ again
    zero = router_input(torch.zeros(2, 4), "log")
    assert torch.isfinite(zero).all() and (zero == 0).all()


def test_bad_input_norm_names_the_value():
    with pytest.raises(ValueError, match="input_norm='rms'.*log, l2, none"):
        build_router("topk", in_features=2, num_experts=2, input_norm="rms")
