"""The expert op's backends: one module each, registering its function, cost and availability with
:func:`molex.kernels.registry.register_backend`. Every module here is imported with the package, so a new
backend is a new file; a backend from another package arrives through the ``molex.kernels`` entry-point group."""

from molex.core.registry import import_submodules

__all__ = import_submodules(__name__, __path__)
