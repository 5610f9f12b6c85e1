"""The expert op's core backends against a float64 per-token loop (forward and gradients)."""

import pytest
import torch
from conftest import assert_close

from molex.kernels import available_backends, mole_delta
from molex.routers.base import RoutingDecision


def per_token_loop(x, A, B, indices, weights, scaling):
    """Deliberately naive: one token, one slot at a time, float64."""
    out = torch.zeros(x.shape[0], B.shape[-1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            s = scaling[e] if isinstance(scaling, torch.Tensor) else scaling
            out[t] += weights[t, j] * s * (B[e].t() @ (A[e] @ x[t]))
    return out


def make_case(T, d_in, d_out, E, r, k, seed=0, skew=False, repeat=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(E, r, d_out, generator=g, dtype=torch.float64)
    if skew:
        idx = torch.zeros(T, k, dtype=torch.long)
    elif repeat:
        idx = torch.randint(0, E, (T, k), generator=g)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    w = torch.rand(T, k, generator=g, dtype=torch.float64) * 2  # unnormalised on purpose
    return x, A, B, idx, w


CASES = [
    dict(T=0, d_in=5, d_out=3, E=2, r=2, k=1),
    dict(T=1, d_in=7, d_out=9, E=3, r=1, k=2),
    dict(T=13, d_in=17, d_out=11, E=4, r=4, k=4),  # k = E
    dict(T=29, d_in=10, d_out=6, E=8, r=3, k=2),
    dict(T=9, d_in=6, d_out=5, E=5, r=2, k=2, skew=True),  # experts 1..4 get no token
    dict(T=9, d_in=6, d_out=5, E=3, r=2, k=3, repeat=True),  # repeated expert ids add up
]


@pytest.mark.parametrize("backend", ["reference", "dense"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("per_expert_scaling", [False, True])
def test_backend_matches_float64_loop(backend, case, per_expert_scaling):
    assert backend in available_backends()
    x, A, B, idx, w = make_case(**case)
    scaling = torch.linspace(0.5, 2.0, A.shape[0], dtype=torch.float64) if per_expert_scaling else 1.5
    expected = per_token_loop(x, A, B, idx, w, scaling)

    leaves = [t.float().requires_grad_() for t in (x, A, B, w)]
    xf, Af, Bf, wf = leaves
    sf = scaling.float() if isinstance(scaling, torch.Tensor) else scaling
    out = mole_delta(xf, Af, Bf, RoutingDecision(idx, wf), sf, backend=backend)
    assert out.shape == expected.shape
    assert_close(out, expected, torch.float32)

    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
    ref_out = per_token_loop(ref_leaves[0], ref_leaves[1], ref_leaves[2], idx, ref_leaves[3], scaling)
    if ref_out.requires_grad:
        ref_out.backward(grad_out)
    if out.requires_grad:  # with no routed token the op may return constant zeros
        out.backward(grad_out.float())
    for got, ref in zip(leaves, ref_leaves, strict=True):
        grad = got.grad if got.grad is not None else torch.zeros_like(got)
        assert_close(grad, ref.grad if ref.grad is not None else torch.zeros_like(ref), torch.float32)
    if case.get("skew"):  # experts that receive no token get exactly zero gradient
        assert torch.count_nonzero(Af.grad[1:]) == 0 and torch.count_nonzero(Bf.grad[1:]) == 0


def test_per_sequence_decision_equals_per_token():
    x, A, B, _, _ = make_case(T=12, d_in=6, d_out=4, E=4, r=2, k=2)
    seq_idx = torch.tensor([[0, 3], [2, 1], [1, 1]])
    seq_w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [1.0, 0.2]], dtype=torch.float64)
    per_seq = RoutingDecision(seq_idx, seq_w, tokens_per_sequence=4)
    per_tok = per_seq.per_token()
    assert per_tok.indices.shape == (12, 2)
    for backend in ["reference", "dense"]:
        a = mole_delta(x, A, B, per_seq, 2.0, backend=backend)
        b = mole_delta(x, A, B, per_tok, 2.0, backend=backend)
        torch.testing.assert_close(a, b)


def test_bad_backend_and_shapes():
    x, A, B, idx, w = make_case(T=3, d_in=4, d_out=2, E=2, r=2, k=1)
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'.*dense"):
        mole_delta(x, A, B, RoutingDecision(idx, w), backend="nope")
    with pytest.raises(ValueError, match="covers 3 tokens but x has 2"):
        mole_delta(x[:2], A, B, RoutingDecision(idx, w))
    with pytest.raises(ValueError, match="expects x"):
        mole_delta(x[None], A, B, RoutingDecision(idx, w))


def test_environment_variable_forces_backend(monkeypatch):
    from molex.kernels import resolve_backend

    x, A, B, idx, w = make_case(T=3, d_in=4, d_out=2, E=2, r=2, k=1)
    decision = RoutingDecision(idx, w)
    monkeypatch.setenv("MOLEX_KERNEL_BACKEND", "reference")
    assert resolve_backend("auto", x, A, B, decision) == "reference"
    assert resolve_backend("dense", x, A, B, decision) == "dense"  # explicit beats the environment
    monkeypatch.setenv("MOLEX_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend 'bogus'"):
        resolve_backend(None, x, A, B, decision)
