"""Routers: one file per router, registered by name. See :mod:`molex.routers.base` for the contract."""

from molex.routers import (  # noqa: F401 - registration side effect
    arrow,
    dlp,
    dynmole,
    features,
    fixed,
    gate,
    milora,
    mtl,
    soft,
    stochastic,
    switch,
    topk,
)
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
from molex.routers.dlp_training import train_dlp_classifier
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
    "update_balance_biases",
    "ContrastiveOptions",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "available_routers",
    "build_router",
    "get_router_class",
    "make_router_config",
    "register_router",
    "DLPConfig",
    "DLPRouter",
    "train_dlp_classifier",
    "DynMoLEConfig",
    "DynMoLERouter",
    "FeaturesConfig",
    "FeaturesRouter",
    "FixedConfig",
    "FixedRouter",
    "GateConfig",
    "GateRouter",
    "MiLoRAConfig",
    "MiLoRARouter",
    "MTLConfig",
    "MTLRouter",
    "SharedRouter",
    "SharedRouterView",
    "SoftConfig",
    "SoftRouter",
    "StochasticConfig",
    "StochasticRouter",
    "average_experts",
    "SwitchConfig",
    "SwitchRouter",
    "TopKConfig",
    "TopKRouter",
]
