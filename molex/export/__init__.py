"""Exits from molex into the ecosystem: plain PEFT adapters and plain ``transformers`` models.

* :mod:`~molex.export.routes`: :func:`export_routes`, one exact PEFT LoRA adapter per route of a
  per-sequence router (``dlp``, ``milora``, ``fixed``, ...), with a ``routes.json`` index;
* :mod:`~molex.export.single`: :func:`export_single`, one PEFT LoRA approximating a token-level
  mixture (expected update on calibration data, truncated by SVD), with its error per layer;
* :mod:`~molex.export.merge_route`: :func:`merge_route`, one route merged into the base weights;
* :mod:`~molex.export.resolve` and :mod:`~molex.export.capture`: routes from prompts or weights,
  and what each layer's expert op computes.
"""

from molex.export.merge_route import merge_route, save_merged
from molex.export.resolve import Route, RoutePrompts, check_per_sequence, resolve_routes
from molex.export.routes import ROUTES_INDEX, ExportedRoutes, export_routes
from molex.export.single import REPORT_NAME, SingleExport, export_single

__all__ = [
    "REPORT_NAME",
    "ROUTES_INDEX",
    "ExportedRoutes",
    "Route",
    "RoutePrompts",
    "SingleExport",
    "check_per_sequence",
    "export_routes",
    "export_single",
    "merge_route",
    "resolve_routes",
    "save_merged",
]
