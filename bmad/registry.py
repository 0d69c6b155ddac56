"""Name -> class registries, filled by ``@register`` and by entry points (timm style).

Built-ins and plugins are found the same way: every entry point in the group is
loaded once, on first use. An entry point naming a module is imported (its
``@register`` decorators run); one naming a class is registered under the entry
point's name. A plugin that fails to load is remembered with its error and
reported by ``bmad list``; it never breaks the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bmad.errors import UsageError

T = TypeVar("T")
PLUGIN_MODULES_ENV = "BMAD_PLUGINS"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: its class, the defaults of this named config, its origin."""

    name: str
    cls: type[T]
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = "builtin"


@dataclass(frozen=True)
class LoadError:
    """An entry point that could not be loaded."""

    entry_point: str
    source: str
    error: str


class Registry(Generic[T]):
    """A registry for one kind of thing (algorithms, reorganizers)."""

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._errors: list[LoadError] = []
        self._loaded = False
        self._current_source = "builtin"

    # -- registration -------------------------------------------------------------
    def register(self, name: str, **defaults: Any) -> Callable[[type[T]], type[T]]:
        """Class decorator: register ``cls`` as ``name`` with constructor ``defaults``.

        Apply it several times to one class for named configs, e.g.
        ``@register("patchcore_r18", backbone="resnet18")``.
        """

        def deco(cls: type[T]) -> type[T]:
            self.add(name, cls, **defaults)
            return cls

        return deco

    def add(self, name: str, cls: type[T], **defaults: Any) -> None:
        """Register ``cls`` under ``name``; re-registering the same class is a no-op."""
        if not name or name != name.strip() or " " in name:
            raise ValueError(f"invalid {self.kind} name {name!r}")
        old = self._entries.get(name)
        if old is not None and old.cls is not cls:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: {old.cls.__module__}.{old.cls.__qualname__} "
                f"and {cls.__module__}.{cls.__qualname__}"
            )
        if not getattr(cls, "name", ""):
            cls.name = name  # type: ignore[attr-defined]
        self._entries[name] = Entry(name, cls, dict(defaults), self._current_source)

    # -- discovery ----------------------------------------------------------------
    def load(self) -> None:
        """Load every entry point of the group once, then the modules named in
        ``$BMAD_PLUGINS`` (comma list: unpackaged plugins, e.g. a script's own algorithm)."""
        if self._loaded:
            return
        self._loaded = True
        for ep in sorted(importlib.metadata.entry_points(group=self.group), key=_ep_order):
            source = "builtin" if ep.name == "builtin" else f"plugin {ep.dist.name if ep.dist else '?'}"
            self._current_source = source
            try:
                obj = ep.load()
                if inspect.isclass(obj) and ep.name not in self._entries:
                    self.add(ep.name, obj)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the rest
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self._errors.append(LoadError(f"{ep.name} = {ep.value}", source, detail))
            finally:
                self._current_source = "builtin"
        for module in filter(None, (m.strip() for m in os.environ.get(PLUGIN_MODULES_ENV, "").split(","))):
            self._current_source = f"module {module}"
            try:
                importlib.import_module(module)  # its @register decorators add its classes
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the rest
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self._errors.append(LoadError(f"{PLUGIN_MODULES_ENV}={module}", self._current_source, detail))
            finally:
                self._current_source = "builtin"

    def errors(self) -> list[LoadError]:
        """Entry points that failed to load, with their errors."""
        self.load()
        return list(self._errors)

    # -- lookup -------------------------------------------------------------------
    def names(self, **filters: Any) -> list[str]:
        """Sorted registered names; ``filters`` match class attributes (e.g. pixel_level=True)."""
        self.load()
        out = []
        for name, entry in self._entries.items():
            if all(getattr(entry.cls, k, None) == v for k, v in filters.items() if v is not None):
                out.append(name)
        return sorted(out)

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name``, or a UsageError listing close names."""
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"run `bmad list {self.kind}s` to see them"
            broken = [e for e in self._errors if e.entry_point.split(" = ")[0] == name]
            if broken:
                hint = f"its plugin failed to load: {broken[0].error}"
            raise UsageError(f"unknown {self.kind} {name!r}", hint=hint) from None

    def create(self, name: str, **params: Any) -> T:
        """Instantiate ``name`` with its named-config defaults overridden by ``params``."""
        entry = self.get(name)
        return entry.cls(**{**entry.defaults, **params})


def _ep_order(ep: importlib.metadata.EntryPoint) -> tuple[int, str]:
    return (0 if ep.name == "builtin" else 1, ep.name)


algorithms: Registry[Any] = Registry("bmad.algorithms", "algo")

register = algorithms.register
create = algorithms.create
names = algorithms.names
