"""One route merged into the base weights: a plain ``transformers`` model that needs no molex to run.

:func:`merge_route` builds a fresh instance of the model's own class, loads the base weights (the
MoLE layers' ``base_layer`` weights under their original names) and adds the route's update
``dW = B @ A`` to every layer the route uses. The molex model is left as it was. :func:`save_merged`
writes the result with ``save_pretrained`` (and the tokenizer's files) into a folder published by
one rename, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it. ``save_pretrained`` first
writes into a scratch folder ``.<name>.molex-save.*`` beside the target that molex marks before
anything else goes in; a save killed mid-write leaves it behind (a full copy of the model), and the
next save into that target deletes such leftovers -- only the ones holding molex's mark for it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.files import (
    SCRATCH_MARKER,
    check_dir_target,
    dir_lock,
    is_scratch,
    make_scratch,
    read_json,
    refuse_foreign,
    remove_scratch,
    replace_dir,
    write_json,
)
from molex.core.model_argument import takes_model
from molex.export.capture import is_conv1d
from molex.export.resolve import RouteSpec, resolve_routes
from molex.layer.inject import mole_layers
from molex.layer.io import adapter_state_dict
from molex.quant import quantized_kind

__all__ = ["MERGED_MARKER", "merge_route", "save_merged"]

#: written beside the model files: the route and the files molex wrote (a later save may replace them)
MERGED_MARKER = "molex_merged.json"
_FORMAT = "molex-merged"


def _base_state(model: nn.Module) -> dict[str, Tensor]:
    """The base model's ``state_dict`` out of the molex one: no experts or routers, ``base_layer`` renamed."""
    adapter_keys = set(adapter_state_dict(model))
    layer_names = list(mole_layers(model))
    state = {}
    for key, value in model.state_dict().items():
        if key in adapter_keys:
            continue
        for name in layer_names:
            prefix = f"{name}.base_layer."
            if key.startswith(prefix):
                key = f"{name}.{key[len(prefix) :]}"
                break
        state[key] = value
    return state


def _refuse_quantized(model: nn.Module) -> None:
    """A quantized base cannot take a float update: re-quantizing the sum would change the whole weight."""
    for name, layer in mole_layers(model).items():
        kind = quantized_kind(layer.base_layer)
        if kind is not None:
            raise ValueError(
                f"merge_route adds the route's update to the base weights, but layer {name!r} has a quantized base "
                f"({kind.label(layer.base_layer)}), which cannot take a float update without re-quantizing all of "
                "it. Load the base unquantized (molex.models.load_model(..., quantization=None)), "
                "molex.load_adapter the saved adapter onto it and merge that; or keep the quantized base and "
                "export adapters instead (molex.export_routes / molex.export_single)"
            )


@takes_model
def merge_route(
    model: nn.Module,
    route: RouteSpec | None = None,
    *,
    tokenizer: Any = None,
) -> nn.Module:
    """A plain copy of ``model``'s base with ``route`` merged into its weights (``model`` is unchanged).

    Args:
        model: a molex model (``molex.load_adapter`` / ``molex.inject``) whose class is a ``transformers``
            model (or any module constructible from ``type(model)(model.config)``).
        route: example prompt(s) that all reach one decision (``"..."``, ``["...", ...]`` or
            ``{"prompts": [...], "task_id": i}``; a per-sequence router decides), per-expert weights
            (``[w_0, ...]`` for every layer, or ``{layer: [w_0, ...]}``), or ``None`` for the ``fixed``
            router's mixture.
        tokenizer: tokenises prompt texts.

    Returns the merged model in eval mode, with the dtype of the base weights. A quantized base
    (:mod:`molex.quant`) is refused with an error that says how to merge into the float base instead.
    """
    if not mole_layers(model):
        raise ValueError(
            f"merge_route merges a molex route into the base weights, but this {type(model).__name__} has no "
            "molex layers, so there is no route to merge; make it a molex model first: "
            "molex.inject(model, molex.MoLEConfig(...)) (and train it), or molex.load_adapter(model, folder) "
            "for a saved adapter"
        )
    key = "route"
    spec: Mapping[str, Any] | None = None if route is None else {key: route}
    routes = resolve_routes(model, spec, tokenizer=tokenizer)
    if len(routes) != 1:
        raise ValueError(
            f"the prompts of this route reach {len(routes)} different decisions, which no single merged model "
            "computes; give prompts that share one decision (or export them all with molex.export_routes)"
        )
    _refuse_quantized(model)
    loras = routes[0].loras()
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"merge_route needs a transformers model (with .config); got {type(model).__name__}")
    state = _base_state(model)
    dtype = next(iter(state.values())).dtype
    merged = type(model)(copy.deepcopy(config)).to(dtype=dtype)
    merged.load_state_dict(state, strict=True)
    layers = mole_layers(model)
    with torch.no_grad():
        for name, (A, B) in loras.items():
            weight = merged.get_submodule(name).weight
            delta = B.double().cpu() @ A.double().cpu()  # [out, in]
            if is_conv1d(layers[name]):
                delta = delta.t()  # Conv1D keeps weight as [in, out]
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(merged, "generation_config"):
        merged.generation_config = copy.deepcopy(generation)
    device = next(model.parameters()).device
    return merged.to(device).eval()


def _ours(directory: Path) -> bool:
    try:
        data = read_json(directory / MERGED_MARKER, fix="")
    except (ValueError, OSError):
        return False
    return isinstance(data, dict) and data.get("format") == _FORMAT


def save_merged(
    merged: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """``merged.save_pretrained`` (and ``tokenizer.save_pretrained``) into ``out_dir``, published by one rename.

    A folder holding model files molex did not write is refused unless ``overwrite=True``; other files
    there are kept. ``info`` (e.g. the route) goes into ``molex_merged.json`` beside the model files.
    """
    target = check_dir_target(out_dir, "merged model folder")
    # one save at a time: another one's scratch folder is never mistaken for a killed save's leftover
    with dir_lock(target):
        _remove_stale_scratch(target)
        previous: Sequence[str] = ()
        if _ours(target):
            previous = read_json(target / MERGED_MARKER, fix="").get("files", [])
        scratch = make_scratch(None, target, prefix=_scratch_prefix(target))
        try:
            merged.save_pretrained(str(scratch))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(scratch))
            written = sorted(p.name for p in scratch.iterdir() if p.name != SCRATCH_MARKER)
            owned = sorted({*written, *previous, MERGED_MARKER})
            refuse_foreign(target, [*written, MERGED_MARKER], ours=_ours, overwrite=overwrite, what="save_merged")

            def write(folder: Path) -> None:
                for name in written:
                    os.replace(scratch / name, folder / name)
                write_json(folder / MERGED_MARKER, {"format": _FORMAT, "files": written, **dict(info or {})})

            replace_dir(target, write, owned=owned)
        finally:
            remove_scratch(scratch)
    return target


def _scratch_prefix(target: Path) -> str:
    return f".{target.name}.molex-save."


def _remove_stale_scratch(target: Path) -> None:
    """Delete the scratch folders of saves into ``target`` that were killed before they finished: only those
    that hold molex's mark for ``target`` (or nothing). Called with the target's lock held."""
    prefix = _scratch_prefix(target)
    for folder in target.parent.iterdir():  # not glob: a folder name may hold glob characters
        if folder.name.startswith(prefix) and is_scratch(folder, target):
            remove_scratch(folder)
