"""molex: mixtures of LoRA experts for Hugging Face models.

``import molex`` needs only torch and safetensors: no GPU, Lightning or Hydra.
"""

from molex import kernels, routers
from molex.allocation.plan import LayerPlan, plan_allocation
from molex.allocation.auto import AllocationDecision, auto_allocate
from molex.layer.config import AllocationConfig, MoLEConfig
from molex.layer.context import RoutingContext, generate, routing_inputs
from molex.layer.experts import LoRAExperts
from molex.export import export_routes, export_single, merge_route
from molex.layer.health import (
    LayerHealth,
    RoutingHealth,
    disable_routing_health,
    enable_routing_health,
    routing_health,
)
from molex.hub import (
    adapter_names,
    fuse_adapters,
    lorahub_search,
    merge_adapters,
    routing_accuracy,
    set_adapter_weights,
    train_router,
)
from molex.layer.inject import (
    aux_losses,
    aux_losses_by_kind,
    find_target_modules,
    get_config,
    inject,
    mole_layers,
    summary,
    total_aux_loss,
    trainable_parameters,
    unload,
)
from molex.layer.masking import mask_experts, masked_experts, unmask_experts
from molex.layer.io import adapter_state_dict, load_adapter, save_adapter
from molex.kernels import mole_delta
from molex.layer.linear import MoLELinear
from molex.routers import RoutingDecision, available_routers, build_router, register_router, update_balance_biases

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "kernels",
    "routers",
    "MoLEConfig",
    "AllocationConfig",
    "LayerPlan",
    "plan_allocation",
    "auto_allocate",
    "AllocationDecision",
    "RoutingContext",
    "routing_inputs",
    "generate",
    "LoRAExperts",
    "MoLELinear",
    "RoutingDecision",
    "available_routers",
    "build_router",
    "register_router",
    "inject",
    "unload",
    "find_target_modules",
    "get_config",
    "mole_layers",
    "summary",
    "aux_losses",
    "aux_losses_by_kind",
    "total_aux_loss",
    "trainable_parameters",
    "mole_delta",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "fuse_adapters",
    "adapter_names",
    "set_adapter_weights",
    "routing_accuracy",
    "train_router",
    "merge_adapters",
    "lorahub_search",
    "export_routes",
    "export_single",
    "merge_route",
    "routing_health",
    "enable_routing_health",
    "disable_routing_health",
    "RoutingHealth",
    "LayerHealth",
    "update_balance_biases",
    "mask_experts",
    "unmask_experts",
    "masked_experts",
]
