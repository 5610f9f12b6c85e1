"""The default router input's fused backward equals autograd's on the plain formula (float64, odd sizes,
zero entries, all-zero padding rows, clamped scales and norms), and the router trains the same with it."""

from __future__ import annotations

import pytest
import torch

from molex.routers.inputs import log_direction, log_direction_reference, router_input


def _inputs(shape, *, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.rand(shape[-1], generator=gen) * 30
    x[..., 0] = 0.0  # a zero channel: autograd's sign gives it no gradient
    x[..., -1] *= 400  # a massive channel, as in SmolLM2's deeper layers
    return x


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 33), (1, 1)])
def test_values_and_gradients_equal_the_plain_formula(shape):
    x = _inputs(shape, seed=sum(shape))
    grad = torch.randn(shape, dtype=torch.float64)
    fused_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused, plain = log_direction(fused_x), log_direction_reference(plain_x)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    fused.backward(grad)
    plain.backward(grad)
    torch.testing.assert_close(fused_x.grad, plain_x.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_in_float64():
    x = _inputs((5, 11), seed=3)
    x[:, 0] = 0.3  # gradcheck's finite differences need every entry away from the kink at 0
    assert torch.autograd.gradcheck(log_direction, (x.requires_grad_(),), eps=1e-7, atol=1e-8)


@pytest.mark.parametrize("row", [torch.zeros(6), torch.full((6,), 1e-14)])
def test_padding_and_tiny_rows_pass_the_same_gradient_as_autograd(row):
    x = torch.stack([row.double(), torch.linspace(-2, 3, 6, dtype=torch.float64)])
    grad = torch.randn(2, 6, dtype=torch.float64)
    fused_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    log_direction(fused_x).backward(grad)
    log_direction_reference(plain_x).backward(grad)
    assert torch.isfinite(fused_x.grad).all()
    torch.testing.assert_close(fused_x.grad, plain_x.grad, rtol=1e-10, atol=1e-12)


def test_router_input_takes_the_fused_path_and_other_norms_are_unchanged():
    x = torch.randn(4, 9)
    assert router_input(x, "log").grad_fn is None  # no grad wanted, none recorded
    with torch.enable_grad():
        y = router_input(x.clone().requires_grad_(), "log")
    assert type(y.grad_fn).__name__ == "_LogDirectionBackward"
    torch.testing.assert_close(router_input(x, "l2"), torch.nn.functional.normalize(x, dim=-1, eps=1e-6))
    assert torch.equal(router_input(x, "none"), x)


def test_a_topk_router_gets_the_same_gradients_with_either_form(monkeypatch):
    import molex
    from molex.routers import inputs

    torch.manual_seed(0)
    router = molex.build_router("topk", in_features=24, num_experts=4, top_k=2)
    x = torch.randn(10, 24) * 5

    def grads():
        router.zero_grad()
        xx = x.clone().requires_grad_()
        decision = router(xx)
        loss = decision.weights.pow(2).sum() + sum(v for v in decision.aux_losses.values())
        loss.backward()
        return xx.grad.clone(), router.gate.weight.grad.clone()

    fused = grads()
    monkeypatch.setattr(inputs, "log_direction", log_direction_reference)
    plain = grads()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
