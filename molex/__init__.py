"""molex: mixtures of LoRA experts for Hugging Face models.

``import molex`` needs only torch and safetensors: no GPU, Lightning or Hydra.
"""

from molex import kernels, routers
from molex.allocation.auto import AllocationDecision, auto_allocate
from molex.allocation.plan import LayerPlan, plan_allocation
from molex.core import moved
from molex.export import export_routes, export_single, merge_route
from molex.hub import (
    adapter_names,
    fuse_adapters,
    lorahub_search,
    merge_adapters,
    routing_accuracy,
    set_adapter_weights,
    train_router,
)
from molex.kernels import mole_delta
from molex.layer.config import AllocationConfig, MoLEConfig
from molex.layer.context import RoutingContext, generate, routing_inputs
from molex.layer.experts import LoRAExperts
from molex.layer.health import (
    LayerHealth,
    RoutingHealth,
    disable_routing_health,
    enable_routing_health,
    routing_health,
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
from molex.layer.io import adapter_state_dict, load_adapter, save_adapter
from molex.layer.linear import MoLELinear
from molex.layer.masking import mask_experts, masked_experts, unmask_experts
from molex.routers import RoutingDecision, available_routers, build_router, register_router, update_balance_biases

__version__ = "0.1.0"

moved.install()  # module paths of molex 0.2 (molex.config, molex.io, ...) still import, with a warning

__all__ = [
    "AllocationConfig",
    "AllocationDecision",
    "LayerHealth",
    "LayerPlan",
    "LoRAExperts",
    "MoLEConfig",
    "MoLELinear",
    "RoutingContext",
    "RoutingDecision",
    "RoutingHealth",
    "__version__",
    "adapter_names",
    "adapter_state_dict",
    "auto_allocate",
    "aux_losses",
    "aux_losses_by_kind",
    "available_routers",
    "build_router",
    "disable_routing_health",
    "enable_routing_health",
    "export_routes",
    "export_single",
    "find_target_modules",
    "fuse_adapters",
    "generate",
    "get_config",
    "inject",
    "kernels",
    "load_adapter",
    "lorahub_search",
    "mask_experts",
    "masked_experts",
    "merge_adapters",
    "merge_route",
    "mole_delta",
    "mole_layers",
    "plan_allocation",
    "register_router",
    "routers",
    "routing_accuracy",
    "routing_health",
    "routing_inputs",
    "save_adapter",
    "set_adapter_weights",
    "summary",
    "total_aux_loss",
    "train_router",
    "trainable_parameters",
    "unload",
    "unmask_experts",
    "update_balance_biases",
]
