"""Every backend on CUDA (bf16 and fp32) against the float64 per-token computation."""

from __future__ import annotations

import pytest
import torch

from molex.kernels import available_backends, mole_delta
from tests.helpers.kernels import check_all, expected, make_problem, run_with_grads

pytestmark = pytest.mark.gpu

CASES = [
    dict(tokens=300, in_features=64, out_features=96, num_experts=8, rank=8, top_k=2, per_expert_scaling=True),
    dict(tokens=257, in_features=128, out_features=64, num_experts=64, rank=16, top_k=2),
    dict(tokens=64, in_features=32, out_features=48, num_experts=4, rank=8, top_k=4, skew=True),
    dict(tokens=128, tokens_per_sequence=32, in_features=64, out_features=64, num_experts=8, rank=8, top_k=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["dense", "per_seq", "grouped", "triton", "megablocks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{tokens}-E{num_experts}-k{top_k}-r{rank}".format(**c))
def test_backend_on_cuda(backend, case, dtype):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    if backend == "megablocks" and dtype == torch.float32:
        pytest.skip("grouped_gemm runs in 16-bit only")
    problem = make_problem(**case)
    grad_out = torch.randn(case["tokens"], case["out_features"], dtype=torch.float64)

    def fn(*args):
        return mole_delta(*args, backend=backend)

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = run_with_grads(fn, problem, dtype, grad_out, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    check_all(got, expected(problem, grad_out), dtype)
