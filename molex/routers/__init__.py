"""Routers: one file per router, registered by name. See :mod:`molex.routers.base` for the contract."""

from molex.routers import fixed, soft, topk  # noqa: F401 - registration side effect
from molex.routers.base import (
    Router,
    RouterConfig,
    RoutingDecision,
    available_routers,
    build_router,
    get_router_class,
    make_router_config,
    register_router,
)
from molex.routers.fixed import FixedConfig, FixedRouter
from molex.routers.soft import SoftConfig, SoftRouter
from molex.routers.topk import TopKConfig, TopKRouter

__all__ = [
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "available_routers",
    "build_router",
    "get_router_class",
    "make_router_config",
    "register_router",
    "FixedConfig",
    "FixedRouter",
    "SoftConfig",
    "SoftRouter",
    "TopKConfig",
    "TopKRouter",
]
