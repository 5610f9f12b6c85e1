"""FSDP2 for a MoLE-injected model: shard it over a data-parallel mesh, gather its adapter back.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2) bottom-up: every shared
router (MiLoRA's per-block ``mole_router``, DLP's model-level one) gets a unit of its own, then every
transformer block (the classes in the model's ``_no_split_modules``), then the root. The routers need
their own unit because they run inside forward *pre*-hooks (the block's or the root's routing hook),
registered at injection, before FSDP's own pre-hook has gathered the block's parameters; as units of
their own they gather their weights when they are called (through ``forward`` or
``prefill_decision``, both registered with FSDP). Token-level routers and the experts live in
their block's unit. Frozen base weights and trainable expert/router weights share a unit: FSDP2
gathers mixed dtypes and reduce-scatters only the gradients that exist (the trainable, float32 ones).

:func:`gather_adapter` is the way back: every rank calls it (it is a collective) and gets the full
expert and router tensors, in float32 on the CPU, to save in molex's adapter format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from molex.layer.io import adapter_state_dict
from molex.routers.sequence import SharedRouter

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["block_classes", "gather_adapter", "is_sharded", "shard_model"]


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: its ``_no_split_modules`` (set by transformers)."""
    names = getattr(model, "_no_split_modules", None) or ()
    return {str(n) for n in names}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard_model` (its parameters are ``DTensor`` shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` (in place) over the 1-D data-parallel ``mesh`` with FSDP2; returns it.

    Every parameter becomes a ``DTensor`` holding ``1 / mesh.size()`` of dim 0 on this rank; forward and
    backward gather each unit's full weights just in time and free them afterwards. Raises
    ``ValueError`` for a mesh that is not 1-D or a model with no known transformer blocks (its whole
    base would be one unit, gathered at once: no memory saved).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh.ndim != 1:
        raise ValueError(f"shard_model needs a 1-D data-parallel mesh, got {mesh.ndim} dims ({mesh.mesh_dim_names})")
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no `_no_split_modules` naming its transformer blocks, so FSDP cannot "
            "shard it block by block; use a transformers causal LM, or set model._no_split_modules = ['<Block>']"
        )
    routers = [m for m in model.modules() if isinstance(m, SharedRouter)]
    for router in routers:
        fully_shard(router, mesh=mesh)
        # the layers reach a shared router through `prefill_decision` (DLP), not only its forward (MiLoRA):
        # FSDP must gather the router's weights around that call too
        register_fsdp_forward_method(router, "prefill_decision")
    found = 0
    for module in model.modules():
        if type(module).__name__ in blocks and module is not model:
            fully_shard(module, mesh=mesh)
            found += 1
    if not found:
        raise ValueError(f"no module of {sorted(blocks)} in {type(model).__name__}: nothing to shard block by block")
    fully_shard(model, mesh=mesh)
    return model


def gather_adapter(model: nn.Module) -> dict[str, Tensor]:
    """The full expert and router tensors of a sharded ``model``, on the CPU, keyed as in
    :func:`molex.adapter_state_dict`. A collective: every rank must call it, in the same order of
    calls; every rank gets the tensors."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    for key, value in sorted(adapter_state_dict(model).items()):  # the same order on every rank
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[key] = full.detach().to("cpu").clone()
    return out
