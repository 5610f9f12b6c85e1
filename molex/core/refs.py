"""Unregistered attributes: how molex keeps a reference on an ``nn.Module`` without owning it.

``nn.Module.__setattr__`` registers every module, parameter or buffer it is given. That is wrong
for references molex keeps on a module without owning them:

* a router shared by several MoLE layers is owned (registered) once, by its block or the root
  model; each layer's view only points at it, so that its weights are stored, counted and moved
  once, and the module tree stays a tree (the root owns the layer that would point back at the
  root's router: a cycle in ``named_modules``);
* a model's input embeddings or an external sentence encoder used by a router belong to the model
  or to nobody, never to the adapter (its ``state_dict`` must not contain them);
* per-model bookkeeping (the routing context, the injection state) must not appear in the
  model's ``state_dict`` or ``named_modules``.

Such values live in the instance ``__dict__`` only. Plain attribute access reads them (the
instance dictionary is looked up before ``nn.Module.__getattr__``); ``.to()``, ``state_dict()``,
``parameters()`` and ``named_modules()`` do not see them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["get_unregistered", "pop_unregistered", "set_unregistered"]


def set_unregistered(owner: nn.Module, name: str, value: Any) -> None:
    """``owner.<name> = value`` without registering ``value`` as a submodule, parameter or buffer."""
    if name in owner._modules or name in owner._parameters or name in owner._buffers:
        raise ValueError(f"{type(owner).__name__} already registers {name!r}; pick another attribute name")
    owner.__dict__[name] = value


def get_unregistered(owner: nn.Module, name: str, default: Any = None) -> Any:
    """The value :func:`set_unregistered` stored under ``name``, or ``default``."""
    return owner.__dict__.get(name, default)


def pop_unregistered(owner: nn.Module, name: str, default: Any = None) -> Any:
    """Remove and return the value stored under ``name`` (``default`` if there is none)."""
    return owner.__dict__.pop(name, default)
