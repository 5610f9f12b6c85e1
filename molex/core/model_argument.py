"""The check on the model a public function is given, so that a wrong object fails at the call with one
message instead of an ``AttributeError`` from deep inside.

The usual mistake is passing what :func:`molex.models.load_model` returns, a ``(model, tokenizer)`` pair,
or a model's name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["require_model", "takes_model"]

F = TypeVar("F", bound=Callable[..., Any])


def require_model(model: object, caller: str) -> nn.Module:
    """``model`` if it is an ``nn.Module``, else a ``TypeError`` naming ``caller``, what it got and the fix."""
    if isinstance(model, nn.Module):
        return model
    got = type(model).__name__
    if isinstance(model, (tuple, list)) and model and isinstance(model[0], nn.Module):
        fix = "load_model returns (model, tokenizer): unpack it, `model, tokenizer = load_model(...)`"
    elif isinstance(model, str):
        fix = f"load it first: `model, tokenizer = molex.models.load_model({model!r})`"
    else:
        fix = "pass the transformers model (or any torch.nn.Module)"
    raise TypeError(f"{caller} needs a model (torch.nn.Module), got a {got}; {fix}")


def takes_model(function: F) -> F:
    """Decorate a public function whose first parameter is the model with :func:`require_model`."""
    caller = f"molex.{function.__name__}"
    name = next(iter(inspect.signature(function).parameters))

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if args:
            require_model(args[0], caller)
        elif name in kwargs:
            require_model(kwargs[name], caller)
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]
