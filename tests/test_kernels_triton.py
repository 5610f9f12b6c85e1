"""The Triton backend against the float64 per-token computation.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py
before anything imports triton): fp32 and fp16 only, since the interpreter's bf16 ``tl.dot`` is
wrong, and small shapes, since it is slow. With CUDA they are compiled for real; bf16 runs under
the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch

from molex.kernels import available_backends, mole_delta
from molex.kernels.backends.grouped import sort_slots
from molex.kernels.grouped_ops import (
    grouped_expand,
    grouped_expand_backward,
    grouped_shrink,
    grouped_shrink_backward,
)
from tests.helpers.kernels import check_all, expected, make_problem, run_with_grads

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [
    dict(tokens=0, in_features=8, out_features=8, num_experts=2, rank=4, top_k=2),
    dict(tokens=1, in_features=5, out_features=3, num_experts=1, rank=1, top_k=1),
    dict(tokens=7, in_features=19, out_features=17, num_experts=8, rank=8, top_k=8, per_expert_scaling=True),
    dict(tokens=40, in_features=33, out_features=40, num_experts=2, rank=16, top_k=1),
    dict(tokens=30, in_features=20, out_features=18, num_experts=64, rank=4, top_k=2, per_expert_scaling=True),
    dict(tokens=24, in_features=12, out_features=10, num_experts=8, rank=4, top_k=2, skew=True),
]


def _run(problem, dtype, grad_out):
    def fn(*args):
        return mole_delta(*args, backend="triton")

    return run_with_grads(fn, problem, dtype, grad_out, device=DEVICE)


def test_triton_backend_is_available():
    assert "triton" in available_backends()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{tokens}-E{num_experts}-k{top_k}-r{rank}".format(**c))
def test_triton_matches_per_token_float64(case, dtype):
    problem = make_problem(**case)
    grad_out = torch.randn(case["tokens"], case["out_features"], dtype=torch.float64)
    want = expected(problem, grad_out)
    got = _run(problem, dtype, grad_out)
    check_all(got, want, dtype)
    if case.get("skew"):
        assert torch.count_nonzero(got[2][1:]) == 0 and torch.count_nonzero(got[3][1:]) == 0


def test_triton_per_sequence_decision():
    problem = make_problem(
        tokens=12, tokens_per_sequence=4, in_features=10, out_features=7, num_experts=4, rank=4, top_k=2
    )
    grad_out = torch.randn(12, 7, dtype=torch.float64)
    check_all(_run(problem, torch.float32, grad_out), expected(problem, grad_out), torch.float32)


def test_opcheck_triton_ops():
    problem = make_problem(tokens=9, in_features=7, out_features=5, num_experts=3, rank=2, top_k=2)
    x, A, B = (t.float().to(DEVICE) for t in (problem.x, problem.A, problem.B))
    order, offsets = sort_slots(problem.indices.to(DEVICE), 3)
    weight = problem.weights.reshape(-1).to(DEVICE)[order].float()
    h = torch.randn(order.shape[0], 2, device=DEVICE)
    grad_out = torch.randn(9, 5, device=DEVICE)
    rg = [t.clone().requires_grad_() for t in (x, A, h, B, weight)]
    torch.library.opcheck(grouped_shrink, (rg[0], rg[1], order, offsets, 2, "triton"))
    torch.library.opcheck(grouped_expand, (rg[2], rg[3], rg[4], order, offsets, 2, "triton"))
    torch.library.opcheck(grouped_shrink_backward, (h, x, A, order, offsets, 2, "triton"))
    torch.library.opcheck(grouped_expand_backward, (grad_out, h, B, weight, order, offsets, 2, "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: "T{tokens}-E{num_experts}-k{top_k}-r{rank}".format(**c))
def test_triton_bf16_on_gpu(case):
    problem = make_problem(**case)
    grad_out = torch.randn(case["tokens"], case["out_features"], dtype=torch.float64)
    check_all(_run(problem, torch.bfloat16, grad_out), expected(problem, grad_out), torch.bfloat16)


@pytest.mark.gpu
def test_triton_compiles_fullgraph_on_gpu():
    from molex.routers.base import RoutingDecision

    problem = make_problem(tokens=64, in_features=32, out_features=48, num_experts=8, rank=8, top_k=2)
    x, A, B = (t.to(DEVICE, torch.bfloat16).requires_grad_() for t in (problem.x, problem.A, problem.B))
    indices, weights = problem.indices.to(DEVICE), problem.weights.to(DEVICE).float()

    def fn(x, A, B, indices, weights):
        return mole_delta(x, A, B, RoutingDecision(indices, weights), 0.5, backend="triton")

    out = torch.compile(fn, fullgraph=True)(x, A, B, indices, weights)
    out.float().sum().backward()
    want = fn(x.detach(), A.detach(), B.detach(), indices, weights)
    torch.testing.assert_close(out.detach().float(), want.float(), atol=5e-2, rtol=5e-2)
