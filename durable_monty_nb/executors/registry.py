"""The executors by name: each registers a factory of backends and the settings it takes.

```python
from durable_monty_nb.executors import register_executor

register_executor("ray", "my_package.ray_backend:Ray", settings=("address",))
```

or, from an installed package, an entry point of the group ``durable_monty_nb.executors``::

    [project.entry-points."durable_monty_nb.executors"]
    ray = "my_package.ray_backend:Ray"

A factory is a callable (or ``"module:attribute"``, imported on first use, so an executor's
extras load only when it is chosen) that takes the settings it declares as keyword arguments
and returns a backend: anything with ``name``, ``remote``, ``check()`` and ``open(run)``
(see :class:`~durable_monty_nb.executors.Backend`). ``%%durable --executor NAME``,
``%config DurableMagics.executor``, ``Engine(executor=NAME)`` and the command line all ask
this registry. Settings not declared are the factory's keyword parameters (read when it is
first used, so an entry point's module is imported only when its executor is chosen).
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENTRY_POINT_GROUP = "durable_monty_nb.executors"
Factory = Callable[..., Any]


@dataclass(frozen=True)
class ExecutorEntry:
    """A registered executor: its name, its factory, and the settings the factory takes."""

    name: str
    factory: Factory | str
    declared: tuple[str, ...] | None = None  # None: the factory's keyword parameters

    @property
    def settings(self) -> tuple[str, ...]:
        """The keyword arguments the factory takes."""
        if self.declared is not None:
            return self.declared
        try:
            parameters = inspect.signature(self.load()).parameters.values()
        except (TypeError, ValueError):
            return ()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in parameters if p.kind in kinds)

    def load(self) -> Factory:
        """The factory itself (importing its module the first time)."""
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        found: Any = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            found = getattr(found, part)
        return found

    def create(self, settings: Mapping[str, Any]) -> Any:
        """A backend of this executor with the given settings (those it does not take and None
        values are left out: the factory's defaults apply)."""
        accepted = self.settings
        chosen = {name: value for name, value in settings.items() if name in accepted and value is not None}
        return self.load()(**chosen)


_ENTRIES: dict[str, ExecutorEntry] = {}
_LOCK = threading.Lock()
_PLUGINS_LOADED = False


def register_executor(
    name: str, factory: Factory | str, *, settings: tuple[str, ...] | list[str] | None = None, replace: bool = False
) -> ExecutorEntry:
    """Make ``name`` an executor: ``factory(**settings)`` returns its backend.

    ``settings``: the keyword arguments the factory takes (default: its keyword parameters).

    Raises ValueError for a name taken by another factory (unless ``replace``) or a bad name.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an executor's name is a Python identifier (letters, digits, _), not {name!r}")
    if not (callable(factory) or (isinstance(factory, str) and factory.strip())):
        raise ValueError(f"the factory of executor {name!r} is a callable or 'module:attribute', not {factory!r}")
    entry = ExecutorEntry(name, factory, None if settings is None else tuple(settings))
    if not all(isinstance(s, str) and s.isidentifier() for s in entry.declared or ()):
        raise ValueError(f"the settings of executor {name!r} are keyword names, not {settings!r}")
    with _LOCK:
        known = _ENTRIES.get(name)
        if known is not None and known.factory != factory and not replace:
            raise ValueError(f"executor {name!r} is already registered ({known.factory!r}); pass replace=True")
        _ENTRIES[name] = entry
    return entry


def unregister_executor(name: str) -> None:
    """Forget an executor (tests and plugins that registered one for a while)."""
    with _LOCK:
        _ENTRIES.pop(name, None)


def _load_plugins() -> None:
    """Register the executors of installed packages' entry points (once, on the first look-up)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        with _LOCK:
            if point.name in _ENTRIES:
                continue  # the package's own, or one registered by code: not replaced by a plugin
        register_executor(point.name, point.value)  # imported when chosen


def executor_names() -> tuple[str, ...]:
    """The names of every registered executor, in registration order."""
    _load_plugins()
    with _LOCK:
        return tuple(_ENTRIES)


def executor_entry(name: str) -> ExecutorEntry:
    """The entry of executor ``name``; ValueError naming the registered ones for another name.

    Installed plugins are looked for only when ``name`` is not registered yet: reading every
    package's entry points costs about 30 ms, and a plugin never replaces a registered name.
    """
    with _LOCK:
        found = _ENTRIES.get(name)
    if found is None:
        _load_plugins()
        with _LOCK:
            found = _ENTRIES.get(name)
    if found is None:
        raise ValueError(
            f"unknown executor {name!r}: choose one of {', '.join(executor_names())} "
            f"(or register yours with durable_monty_nb.executors.register_executor)"
        )
    return found


def create_backend(name: str, settings: Mapping[str, Any] | None = None, /, **more: Any) -> Any:
    """A backend of the executor ``name`` with ``settings`` (those it does not take are left out)."""
    return executor_entry(name).create({**(settings or {}), **more})
