"""Every CPU backend of ``mole_delta`` against a float64 per-token computation, forward and backward."""

from __future__ import annotations

import random

import pytest
import torch

from molex.kernels import ENV_VAR, available_backends, estimate_cost, mole_delta, resolve_backend
from molex.kernels.backends.grouped import run_grouped, sort_slots
from molex.kernels.grouped_ops import (
    grouped_expand,
    grouped_expand_backward,
    grouped_shrink,
    grouped_shrink_backward,
)
from molex.routers.base import RoutingDecision
from tests.helpers.kernels import check_all, expected, make_problem, run_with_grads
from tests.helpers.models import assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

# the Triton interpreter is exercised in test_kernels_triton.py; megablocks needs CUDA
CPU_BACKENDS = [b for b in ("reference", "dense", "per_seq", "grouped") if b in available_backends()]


def _cases() -> list[dict]:
    """Randomised shapes covering T in {0, 1, 7, 300}, r in {1, 4, 8, 16}, E in {1, 2, 8, 64},
    k in {1, 2, E}, in/out not multiples of 16, per-expert scalings."""
    rng = random.Random(1234)
    cases = []
    for tokens in (0, 1, 7, 300):
        for num_experts in (1, 2, 8, 64):
            top_k = rng.choice([k for k in (1, 2, num_experts) if k <= num_experts])
            if tokens == 300 and top_k == 64:
                top_k = 2  # keeps the float64 reference small; k = E = 64 is covered at T = 7
            cases.append(
                dict(
                    tokens=tokens,
                    num_experts=num_experts,
                    top_k=top_k,
                    rank=rng.choice((1, 4, 8, 16)),
                    in_features=rng.choice((5, 19, 33)),
                    out_features=rng.choice((3, 17, 40)),
                    per_expert_scaling=rng.random() < 0.5,
                    seed=rng.randrange(1 << 16),
                )
            )
    cases.append(dict(tokens=7, num_experts=64, top_k=64, rank=4, in_features=9, out_features=11, seed=3))
    return cases


CASES = _cases()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{tokens}-E{num_experts}-k{top_k}-r{rank}".format(**c))
def test_backend_matches_per_token_float64(backend, case):
    problem = make_problem(**case)
    grad_out = torch.randn(case["tokens"], case["out_features"], dtype=torch.float64)

    def fn(*args):
        return mole_delta(*args, backend=backend)

    check_all(run_with_grads(fn, problem, torch.float64, grad_out), expected(problem, grad_out), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(backend, dtype):
    problem = make_problem(
        tokens=50, in_features=24, out_features=20, num_experts=4, rank=8, top_k=2, per_expert_scaling=True
    )
    grad_out = torch.randn(50, 20, dtype=torch.float64)

    def fn(*args):
        return mole_delta(*args, backend=backend)

    check_all(run_with_grads(fn, problem, dtype, grad_out), expected(problem, grad_out), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_skewed_routing_leaves_empty_experts_exactly_zero(backend):
    problem = make_problem(tokens=40, in_features=12, out_features=10, num_experts=8, rank=4, top_k=2, skew=True)
    grad_out = torch.randn(40, 10, dtype=torch.float64)

    def fn(*args):
        return mole_delta(*args, backend=backend)

    actual = run_with_grads(fn, problem, torch.float32, grad_out)
    check_all(actual, expected(problem, grad_out), torch.float32)
    grad_A, grad_B = actual[2], actual[3]
    assert torch.count_nonzero(grad_A[1:]) == 0 and torch.count_nonzero(grad_B[1:]) == 0
    assert torch.count_nonzero(grad_A[0]) > 0


def test_per_sequence_routing_agrees_across_backends():
    """A per-sequence decision, and the same decision expressed per token, give one result everywhere."""
    problem = make_problem(
        tokens=3 * 6,
        tokens_per_sequence=6,
        in_features=13,
        out_features=9,
        num_experts=5,
        rank=4,
        top_k=2,
        per_expert_scaling=True,
    )
    grad_out = torch.randn(18, 9, dtype=torch.float64)
    want = expected(problem, grad_out)
    for backend in CPU_BACKENDS:

        def per_seq(x, A, B, decision, scaling, backend=backend):
            return mole_delta(x, A, B, decision, scaling, backend=backend)

        def per_token(x, A, B, decision, scaling, backend=backend):
            token_level = RoutingDecision(decision.token_indices(), decision.token_weights())
            return mole_delta(x, A, B, token_level, scaling, backend=backend)

        check_all(run_with_grads(per_seq, problem, torch.float64, grad_out), want, torch.float64)
        check_all(run_with_grads(per_token, problem, torch.float64, grad_out), want, torch.float64)


def test_sort_slots_offsets_and_order():
    indices = torch.tensor([[2, 0], [2, 2], [1, 0]])
    order, offsets = sort_slots(indices, 4)
    assert offsets.tolist() == [2, 3, 6, 6]  # expert 3 is empty
    assert indices.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2, 2]
    assert order.tolist() == [1, 5, 4, 0, 2, 3]  # stable: token order kept within a group


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_mm_path_matches():
    # grouped_mm needs 16-byte aligned strides (fp32: multiples of 4); it is used on CUDA only, checked here
    problem = make_problem(tokens=30, in_features=16, out_features=12, num_experts=4, rank=4, top_k=2)
    grad_out = torch.randn(30, 12, dtype=torch.float64)

    def fn(x, A, B, decision, scaling):
        return run_grouped(x, A, B, decision, scaling, impl="torch", use_grouped_mm=True)

    check_all(run_with_grads(fn, problem, torch.float32, grad_out), expected(problem, grad_out), torch.float32)


def _op_args(dtype=torch.float32):
    problem = make_problem(tokens=9, in_features=7, out_features=5, num_experts=3, rank=2, top_k=2)
    x, A, B = (t.to(dtype) for t in (problem.x, problem.A, problem.B))
    order, offsets = sort_slots(problem.indices, 3)
    weight = problem.weights.reshape(-1)[order].to(dtype)
    h = torch.randn(order.shape[0], 2, dtype=dtype)
    return x, A, B, order, offsets, weight, h


@pytest.mark.parametrize("impl", ["torch"])
def test_opcheck_grouped_ops(impl):
    x, A, B, order, offsets, weight, h = _op_args()
    grad_out = torch.randn(9, 5)
    rg = [t.clone().requires_grad_() for t in (x, A, h, B, weight)]
    torch.library.opcheck(grouped_shrink, (rg[0], rg[1], order, offsets, 2, impl))
    torch.library.opcheck(grouped_expand, (rg[2], rg[3], rg[4], order, offsets, 2, impl))
    torch.library.opcheck(grouped_shrink_backward, (h, x, A, order, offsets, 2, impl))
    torch.library.opcheck(grouped_expand_backward, (grad_out, h, B, weight, order, offsets, 2, impl))


@pytest.mark.parametrize("backend", ["dense", "per_seq", "grouped"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    problem = make_problem(
        tokens=12, tokens_per_sequence=4, in_features=8, out_features=6, num_experts=3, rank=2, top_k=2
    )
    x, A, B = (t.float().requires_grad_() for t in (problem.x, problem.A, problem.B))
    decision = problem.decision(problem.weights.float())

    def fn(x, A, B, indices, weights):
        d = RoutingDecision(indices, weights, tokens_per_sequence=decision.tokens_per_sequence)
        return mole_delta(x, A, B, d, 0.5, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, A, B, decision.indices, decision.weights)
    out.sum().backward()
    want = fn(x.detach(), A.detach(), B.detach(), decision.indices, decision.weights)
    assert_close(out.detach(), want)
    assert x.grad is not None and A.grad is not None


# --- selection -------------------------------------------------------------------------------------------


def _dims(**overrides):
    dims = dict(tokens=4096, in_features=2048, out_features=2048, num_experts=8, rank=8, top_k=2, device_type="cpu")
    dims.update(overrides)
    return dims


def _pick(candidates, **overrides):
    return min(candidates, key=lambda b: estimate_cost(b, **_dims(**overrides)))


def test_cost_model_crossover():
    cands = ["dense", "per_seq", "grouped", "triton", "megablocks"]
    assert _pick(cands) == "dense"  # typical MoLE: E r = 64
    assert _pick(cands, num_experts=64, rank=64) == "grouped"  # fused hub: E r = 4096
    # decoding a fused hub (4 tokens): grouped reads only the <= 8 experts in use, dense all 64
    assert _pick(cands, tokens=4, num_experts=64, rank=64) == "grouped"
    assert _pick(cands, tokens=4) == "dense"
    assert _pick(cands, num_sequences=4) == "per_seq"  # per-sequence routing, long sequences
    assert estimate_cost("per_seq", **_dims()) == float("inf")  # never for per-token decisions
    assert estimate_cost("triton", **_dims()) == float("inf")  # interpreter only on CPU
    assert _pick(cands, num_experts=64, rank=64, device_type="cuda") in ("triton", "grouped")


def test_resolve_order_explicit_env_auto(monkeypatch):
    problem = make_problem(tokens=8, in_features=4, out_features=4, num_experts=2, rank=2, top_k=1)
    args = (problem.x, problem.A, problem.B, problem.decision())
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", *args) == "dense"
    monkeypatch.setenv(ENV_VAR, "grouped")
    assert resolve_backend("auto", *args) == "grouped"
    assert resolve_backend("per_seq", *args) == "per_seq"  # explicit beats the environment
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match="known backends"):
        resolve_backend("auto", *args)


def test_unavailable_backends_explain_themselves(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problem = make_problem(tokens=4, in_features=4, out_features=4, num_experts=2, rank=2, top_k=1)
    args = (problem.x, problem.A, problem.B, problem.decision())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            mole_delta(*args, backend="megablocks")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            mole_delta(*args, backend="triton")


def test_megablocks_import_error_names_the_extra(monkeypatch):
    import builtins

    from molex.kernels.backends import megablocks

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith(("megablocks", "grouped_gemm")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install molex-lora\[gpu\]"):
        megablocks._import()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dense", "per_seq"])
def test_compile_inductor_fullgraph(backend):
    torch._dynamo.reset()
    problem = make_problem(
        tokens=12, tokens_per_sequence=4, in_features=8, out_features=6, num_experts=3, rank=2, top_k=2
    )
    x, A, B = (t.float().requires_grad_() for t in (problem.x, problem.A, problem.B))

    def fn(x, A, B, indices, weights):
        return mole_delta(x, A, B, RoutingDecision(indices, weights, tokens_per_sequence=4), 0.5, backend=backend)

    weights = problem.weights.float()
    out = torch.compile(fn, fullgraph=True)(x, A, B, problem.indices, weights)
    out.sum().backward()
    assert_close(out.detach(), fn(x.detach(), A.detach(), B.detach(), problem.indices, weights))
