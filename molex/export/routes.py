"""Exact export of per-sequence routes: one plain PEFT LoRA adapter per route, and an index.

With a router that decides once per sequence, every layer applies one fixed weighted set of experts
to the whole sequence, and ``sum_e w_e s_e B_e A_e`` over the chosen experts is exactly one LoRA of
rank ``sum of their ranks`` (A's rows and the weighted, scaled B's columns concatenated; see
:func:`molex.export.capture.lora_of_gate`). Each route is therefore an ordinary PEFT adapter that
``PeftModel.from_pretrained``, vLLM and LoRAX read, and whose outputs on the route's prompts are
the routed model's.

``out_dir`` gets one folder per route and ``routes.json`` (route -> adapter folder, decision per
layer, ranks, the prompts and route names it covers), published together by one folder rename.
Each route folder also holds ``molex_route.json``, the checksums of its files: a later export
replaces a folder the previous ``routes.json`` lists only when those checksums prove molex wrote
it, so an index naming any other entry (``"adapter": "README.md"``) can never make it delete one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from molex.core.files import check_dir_target, dir_lock, read_json, replace_dir, sha256_file, write_json
from molex.core.model_argument import takes_model
from molex.export.capture import is_conv1d
from molex.export.resolve import Route, RoutePrompts, RouteSpec, resolve_routes
from molex.hub.peft_format import peft_adapter_files, write_adapter_files
from molex.layer.inject import get_config, mole_layers

__all__ = ["ROUTES_INDEX", "ROUTE_MARKER", "ExportedRoutes", "export_routes", "route_folder_names"]

ROUTES_INDEX = "routes.json"
#: in every route folder: ``{"format": "molex-route", "sha256": {file name: checksum}}``
ROUTE_MARKER = "molex_route.json"
FORMAT = "molex-routes"
FORMAT_VERSION = 1
_ROUTE_FORMAT = "molex-route"


@dataclass
class ExportedRoutes:
    """What :func:`export_routes` wrote: ``path`` (the output folder) and ``index`` (``routes.json``)."""

    path: Path
    index: dict[str, Any]

    @property
    def adapters(self) -> dict[str, Path]:
        """``{route: PEFT adapter folder}``."""
        return {name: self.path / entry["adapter"] for name, entry in self.index["routes"].items()}


def _safe(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned or "route"


def route_folder_names(routes: Sequence[Route]) -> list[str]:
    """A folder name per route: the name it was given when that name reached this one route only,
    else ``route-<i>``; never ``routes.json`` and never twice the same."""
    routes_of: dict[str, int] = {}
    for route in routes:
        for group in route.groups:
            routes_of[group] = routes_of.get(group, 0) + 1
    names: list[str] = []
    for i, route in enumerate(routes):
        name = f"route-{i:02d}"
        if len(route.groups) == 1 and routes_of[route.groups[0]] == 1:
            name = _safe(route.groups[0])
        while name in names or name == ROUTES_INDEX:
            name = f"{name}-{i}"
        names.append(name)
    return names


def _previous_index(target: Path) -> dict[str, Any] | None:
    path = target / ROUTES_INDEX
    if not path.is_file():
        return None
    try:
        data = read_json(path, fix="")
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _write_marker(folder: Path) -> None:
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    write_json(folder / ROUTE_MARKER, {"format": _ROUTE_FORMAT, "sha256": sums})


def _is_route_folder(target: Path, name: str) -> bool:
    """Whether ``target / name`` is a route folder exactly as an export wrote it: a plain folder directly in
    ``target`` holding its ``molex_route.json`` and precisely the files that lists, with those checksums."""
    if name in ("", ".", "..") or Path(name).name != name:
        return False
    folder = target / name
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        data = read_json(folder / ROUTE_MARKER, fix="")
        present = {p.name for p in folder.iterdir()} - {ROUTE_MARKER}
    except (OSError, ValueError):
        return False
    sums = data.get("sha256") if isinstance(data, dict) and data.get("format") == _ROUTE_FORMAT else None
    if not isinstance(sums, dict) or present != set(sums):
        return False
    files = [folder / n for n in sums]
    return all(f.is_file() and not f.is_symlink() and sha256_file(f) == sums[f.name] for f in files)


def _listed(previous: dict[str, Any] | None) -> set[object]:
    routes = previous.get("routes") if previous else None
    if not isinstance(routes, dict):
        return set()
    return {entry.get("adapter") for entry in routes.values() if isinstance(entry, dict)}


def _owned_names(target: Path, names: Sequence[str], overwrite: bool) -> list[str]:
    """The entries this export replaces: its own, plus the route folders of the previous export that molex
    can prove it wrote (never a name only because ``routes.json`` lists it). An entry in the way that
    molex did not write is refused unless ``overwrite``."""
    previous = _previous_index(target)
    proven = {n for n in _listed(previous) if isinstance(n, str) and _is_route_folder(target, n)}
    if target.is_dir() and not overwrite:
        foreign = sorted(n for n in (ROUTES_INDEX, *names) if (target / n).exists() and n not in proven)
        if previous is not None and ROUTES_INDEX in foreign:
            foreign.remove(ROUTES_INDEX)
        if foreign:
            raise FileExistsError(
                f"{target} holds {', '.join(foreign)} that molex did not write; export_routes refuses to replace "
                "them: choose another folder, or pass overwrite=True to replace them"
            )
    return sorted({ROUTES_INDEX, *names, *proven})


@takes_model
def export_routes(
    model: nn.Module,
    out_dir: str | os.PathLike,
    routes: Mapping[str, RouteSpec] | Sequence[str] | RoutePrompts | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> ExportedRoutes:
    """Write one plain PEFT LoRA adapter per route of ``model`` (an injected or loaded molex model).

    Args:
        model: a molex model; prompt routes need a router that decides once per sequence (``dlp``,
            ``milora``, ``fixed``, ``mtl``, ...), otherwise a ``ValueError`` points to
            :func:`molex.export_single` (approximate).
        out_dir: the output folder: ``routes.json`` and one adapter folder per route.
        routes: ``{name: spec}``: example prompts (``["...", ...]``, ``{"prompts": [...], "task_id": i}`` or
            :class:`~molex.export.resolve.RoutePrompts`; the router decides, prompts that reach the same
            decision share one adapter, a name whose prompts reach several decisions gives several), or
            explicit per-expert weights (``[w_0, ...]`` for every layer, or ``{layer: [w_0, ...]}``);
            a plain list of prompts (or one ``RoutePrompts``); ``None`` for the ``fixed`` router's one route.
        tokenizer: tokenises prompt texts.
        batch_size: prompts per forward pass.
        overwrite: replace entries of ``out_dir`` that molex did not write.

    Each adapter holds, per layer, only the experts with a non-zero weight (a single-expert route has
    that expert's rank); ``rank_pattern`` / ``alpha_pattern`` give layers of other ranks. The folder
    is published by one rename (a crash leaves the previous export or the new one).
    """
    target = check_dir_target(out_dir, "export_routes out_dir")
    resolved = resolve_routes(model, routes, tokenizer=tokenizer, batch_size=batch_size)
    names = route_folder_names(resolved)
    config = get_config(model)
    conv1d = any(is_conv1d(layer) for layer in mole_layers(model).values())
    files, entries = {}, {}
    for name, route in zip(names, resolved, strict=True):
        loras = route.loras()
        if not loras:
            raise ValueError(
                f"route {name!r} adds nothing to the base model (every chosen expert has weight 0 or zero factors); "
                "there is no adapter to write"
            )
        files[name] = peft_adapter_files(
            loras, base_model_name_or_path=config.base_model_name_or_path, fan_in_fan_out=conv1d
        )
        entries[name] = {
            "adapter": name,
            "covers": list(route.groups),
            "prompts": [p if isinstance(p, str) else list(p) for p in route.prompts],
            "rank": {layer: int(A.shape[0]) for layer, (A, _) in loras.items()},
            "decision": route.decision(),
        }
    by_name: dict[str, list[str]] = {}  # each given name -> the route folders its prompts reached
    for name, route in zip(names, resolved, strict=True):
        for group in route.groups:
            by_name.setdefault(group, []).append(name)
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": config.base_model_name_or_path,
        "router": config.router_name,
        "routes": entries,
        "by_name": by_name,
    }

    def write(folder: Path) -> None:
        for name, (tensors, peft_config) in files.items():
            (folder / name).mkdir()
            write_adapter_files(folder / name, tensors, peft_config)
            _write_marker(folder / name)
        write_json(folder / ROUTES_INDEX, index)

    with dir_lock(target):  # what the previous export left is judged and replaced in one turn
        replace_dir(target, write, owned=_owned_names(target, names, overwrite))
    return ExportedRoutes(target, index)
