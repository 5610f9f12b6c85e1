"""Routers from other packages on the command line: ``molex-train router=<name>``.

Hydra's ``router=`` group holds one yaml file per built-in router (``molex/conf/router/``). A router that an
installed package registers (``molex.routers`` entry points) or that a user registered before calling a CLI's
``main`` has no file there, so each CLI stores an equivalent node for it in Hydra's ConfigStore before the
config is composed: the router's name and the defaults of its config dataclass.
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from typing import Any

__all__ = ["router_node", "store_registered_routers"]


def router_node(name: str) -> dict[str, Any]:
    """The ``router`` group node of router ``name``: what its yaml file would hold."""
    from molex.routers import get_router_class

    config = get_router_class(name).config_class()
    options = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"_target_": "molex.routers.make_router_config", "name": name, "options": options}


def store_registered_routers() -> list[str]:
    """Store a ``router`` group node for every registered router without a yaml file; returns their names."""
    from hydra.core.config_store import ConfigStore

    from molex.routers import available_routers

    shipped = {p.name.removesuffix(".yaml") for p in files("molex.conf").joinpath("router").iterdir()}
    stored = [name for name in available_routers() if name not in shipped]
    for name in stored:
        ConfigStore.instance().store(group="router", name=name, node=router_node(name))
    return stored


def _plain(value: Any) -> Any:
    """A dataclass default as a value OmegaConf accepts (tuples become lists, nested dataclasses dicts)."""
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
