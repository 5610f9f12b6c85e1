"""Module paths of molex 0.2 that moved when the package was grouped into layers.

``import molex.config`` (and ``from molex.config import MoLEConfig``) keep working: a finder on
``sys.meta_path`` serves the module's new home under the old name, with a ``DeprecationWarning`` that names
it. ``molex.inject`` is also the function ``molex.inject``, and binding the module to that name would
replace the function, so that one path is refused with a message naming ``molex.layer.inject`` instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

#: old module path -> new module path
MOVED: dict[str, str] = {
    "molex._refs": "molex.core.refs",
    "molex.analysis": "molex.evaluation.analysis",
    "molex.apportion": "molex.allocation.budget",
    "molex.auto_allocation": "molex.allocation.auto",
    "molex.config": "molex.layer.config",
    "molex.context": "molex.layer.context",
    "molex.decision": "molex.core.decision",
    "molex.eval": "molex.evaluation.generation",
    "molex.eval_harness": "molex.evaluation.harness",
    "molex.experts": "molex.layer.experts",
    "molex.files": "molex.core.files",
    "molex.harness_model": "molex.evaluation.harness_model",
    "molex.health": "molex.layer.health",
    "molex.hub.evaluate": "molex.evaluation.hub",
    "molex.hub.export_average": "molex.export.average",
    "molex.inject": "molex.layer.inject",
    "molex.io": "molex.layer.io",
    "molex.losses": "molex.core.losses",
    "molex.model_argument": "molex.core.model_argument",
    "molex.placement": "molex.layer.placement",
    "molex.routers.dlp_training": "molex.training.dlp",
    "molex.routing_checks": "molex.layer.routing_checks",
    "molex.sources": "molex.core.sources",
    "molex.tables": "molex.core.tables",
}
#: old paths that are also a public attribute of their parent package: refused, never bound
_REFUSED = {"molex.inject"}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        if fullname in _REFUSED:
            raise ModuleNotFoundError(
                f"{fullname} moved to {MOVED[fullname]}: use `from {MOVED[fullname]} import ...` "
                f"({fullname.rpartition('.')[2]}() itself is still molex.{fullname.rpartition('.')[2]})",
                name=fullname,
            )
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {MOVED[spec.name]}; import it from there", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        return None  # the new module is already executed


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
