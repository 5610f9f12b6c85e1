"""Routers: one file per router, registered by name. See :mod:`molex.routers.base` for the contract.

Every module of this folder is imported with the package (a new router is a new file); routers from other
packages arrive through the ``molex.routers`` entry-point group.
"""

from typing import Any

from molex.core.registry import import_submodules
from molex.routers.balance import BalanceOptions, BiasBalancedRouter, update_balance_biases
from molex.routers.base import (
    ContrastiveOptions,
    Router,
    RouterConfig,
    RoutingDecision,
    available_routers,
    build_router,
    get_router_class,
    make_router_config,
    register_router,
)
from molex.routers.dlp import DLPConfig, DLPRouter
from molex.routers.dynmole import DynMoLEConfig, DynMoLERouter
from molex.routers.features import FeaturesConfig, FeaturesRouter
from molex.routers.fixed import FixedConfig, FixedRouter
from molex.routers.gate import GateConfig, GateRouter
from molex.routers.milora import MiLoRAConfig, MiLoRARouter
from molex.routers.mtl import MTLConfig, MTLRouter
from molex.routers.sequence import SharedRouter, SharedRouterView
from molex.routers.soft import SoftConfig, SoftRouter
from molex.routers.stochastic import StochasticConfig, StochasticRouter, average_experts
from molex.routers.switch import SwitchConfig, SwitchRouter
from molex.routers.topk import TopKConfig, TopKRouter

__all__ = [
    "BalanceOptions",
    "BiasBalancedRouter",
    "ContrastiveOptions",
    "DLPConfig",
    "DLPRouter",
    "DynMoLEConfig",
    "DynMoLERouter",
    "FeaturesConfig",
    "FeaturesRouter",
    "FixedConfig",
    "FixedRouter",
    "GateConfig",
    "GateRouter",
    "MTLConfig",
    "MTLRouter",
    "MiLoRAConfig",
    "MiLoRARouter",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "SharedRouter",
    "SharedRouterView",
    "SoftConfig",
    "SoftRouter",
    "StochasticConfig",
    "StochasticRouter",
    "SwitchConfig",
    "SwitchRouter",
    "TopKConfig",
    "TopKRouter",
    "available_routers",
    "average_experts",
    "build_router",
    "get_router_class",
    "make_router_config",
    "register_router",
    "update_balance_biases",
]

# the rest of the folder's routers (arrow, fixed, ...) register on import too
import_submodules(__name__, __path__)


def __getattr__(name: str) -> Any:
    if name == "train_dlp_classifier":  # moved: fitting is a training service, above the routers
        raise AttributeError(
            "molex.routers.train_dlp_classifier moved to molex.training.train_dlp_classifier: "
            "use `from molex.training import train_dlp_classifier`"
        )
    raise AttributeError(f"module 'molex.routers' has no attribute {name!r}")
