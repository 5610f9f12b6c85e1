"""One registry helper for every kind of plug-in molex looks up by name.

Routers, kernel backends, allocation schedules, quantization schemes, fitters and grouped-GEMM
implementations each keep a :class:`Registry`. They share one duplicate policy: registering a name again
with a *different* object raises, unless ``replace=True``; registering the same object again is a no-op
(a module imported twice). A registry may name an entry-point group (``molex.routers``,
``molex.kernels``): installed packages that declare an entry point there are imported on the first
lookup, so a third-party router reaches ``molex.build_router`` and ``molex-train router=<name>``
without molex knowing its name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

__all__ = ["Registry", "import_submodules"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Mapping[str, T], Generic[T]):
    """Name -> object, with one duplicate policy and optional entry-point plug-ins.

    It is a read-only :class:`~collections.abc.Mapping` (``name in reg``, ``reg[name]``, ``sorted(reg)``);
    :meth:`register` is the only way in. ``reg[name]`` raises :class:`KeyError` like a dict;
    :meth:`get_or_raise` raises a :class:`ValueError` that lists the known names and says how to add one.

    Args:
        kind: what the entries are, for messages (``"router"``, ``"kernel backend"``).
        entry_point_group: the ``importlib.metadata`` entry-point group whose plug-ins are loaded, once,
            on the first lookup; ``None`` for none.
        how_to_register: the hint shown after an unknown name (``"register your own with ..."``).
    """

    def __init__(self, kind: str, *, entry_point_group: str | None = None, how_to_register: str = "") -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.how_to_register = how_to_register
        self._entries: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []

    # -- registration -------------------------------------------------------------------------------------
    @overload
    def register(self, name: str, obj: T, *, replace: bool = False) -> T: ...
    @overload
    def register(self, name: str, obj: None = None, *, replace: bool = False) -> Callable[[T], T]: ...

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` (or, without ``obj``, return a decorator that does).

        Raises ``ValueError`` if ``name`` is empty, or already holds a different object and ``replace`` is false.
        """
        if obj is None:
            return lambda target: self.register(name, target, replace=replace)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name to be registered, got {name!r}")
        with self._lock:
            current = self._entries.get(name)
            if current is not None and current is not obj and not replace:
                raise ValueError(
                    f"a {self.kind} named {name!r} is already registered ({_describe(current)}); choose another "
                    f"name, or pass replace=True to replace it with {_describe(obj)}"
                )
            self._entries[name] = obj
        for listener in self._listeners:
            listener()
        return obj

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every registration (caches keyed on the registry's contents)."""
        self._listeners.append(listener)

    # -- lookup ---------------------------------------------------------------------------------------------
    def get_or_raise(self, name: str) -> T:
        """The entry ``name``; a ``ValueError`` listing the known names if there is none."""
        self._load_plugins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            hint = f" {self.how_to_register}" if self.how_to_register else ""
            known = ", ".join(self.names())
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}.{hint}") from None

    def names(self) -> list[str]:
        """Registered names, sorted (plug-ins included)."""
        self._load_plugins()
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        self._load_plugins()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"

    # -- plug-ins -------------------------------------------------------------------------------------------
    def _load_plugins(self) -> None:
        """Import every entry point of the group once. A plug-in that fails warns (naming it) and is skipped.

        An entry point names a module whose import registers its objects, or an object that is registered
        under the entry point's name (a router class registers under its own ``name``).
        """
        if self._plugins_loaded:
            return
        with self._lock:
            if self._plugins_loaded:
                return
            self._plugins_loaded = True  # set first: a plug-in's own lookups must not recurse
            for entry_point in importlib.metadata.entry_points(group=self.entry_point_group):
                try:
                    loaded = entry_point.load()
                except Exception as err:  # a broken third-party package must not break molex
                    log.warning(
                        "%s plug-in %r (%s, entry point group %s) failed to load and is skipped: %s: %s",
                        self.kind, entry_point.name, entry_point.value, self.entry_point_group,
                        type(err).__name__, err,
                    )  # fmt: skip
                    continue
                if not _is_module(loaded) and loaded not in self._entries.values():
                    self.register(getattr(loaded, "name", "") or entry_point.name, loaded)


def _is_module(obj: Any) -> bool:
    return type(obj).__name__ == "module"


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


def import_submodules(package: str, path: list[str] | Any, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__path__`` is ``path``) but those named in ``skip`` or
    starting with ``_``, in name order; returns their names. A package whose modules register themselves
    (one file per router or backend) calls this from its ``__init__``, so adding one is adding a file."""
    names = sorted(
        info.name for info in pkgutil.iter_modules(path) if not info.name.startswith("_") and info.name not in skip
    )
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
