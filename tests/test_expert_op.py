"""Bad input to the expert op gets errors that name the problem (numerics live in test_kernels.py)."""

import pytest
import torch

from molex.kernels import mole_delta
from molex.routers.base import RoutingDecision


def test_bad_backend_and_shapes():
    x, A, B = torch.randn(3, 4), torch.randn(2, 2, 4), torch.randn(2, 2, 5)
    decision = RoutingDecision(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'.*dense"):
        mole_delta(x, A, B, decision, backend="nope")
    with pytest.raises(ValueError, match="covers 3 tokens but x has 2"):
        mole_delta(x[:2], A, B, decision)
    with pytest.raises(ValueError, match="expects x"):
        mole_delta(x[None], A, B, decision)
    with pytest.raises(ValueError, match="shape mismatch"):
        mole_delta(x, A, B[:1], decision)
