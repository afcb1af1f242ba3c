"""Plugin discovery: entry points in group ``tunestack``, each loaded on its own.

A plugin that fails to import, or registers a malformed method, is recorded with its distribution,
version and error and skipped; everything else keeps working. ``TUNESTACK_STRICT_PLUGINS=1``
re-raises instead. ``TUNESTACK_DISABLE_PLUGINS=name,...`` skips plugins by entry-point or
distribution name. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel

from tunestack import hookspecs
from tunestack.errors import PluginError
from tunestack.methods import Contract, MethodSpec, Options, TaskSpec

GROUP = "tunestack"
ESSENTIAL = frozenset({"tasks", "default-step"})  # the run loop cannot work without these
STRICT_ENV = "TUNESTACK_STRICT_PLUGINS"
DISABLE_ENV = "TUNESTACK_DISABLE_PLUGINS"
TRACE_ENV = "TUNESTACK_TRACE_HOOKS"
CORE_DIST = "tunestack"


@dataclass
class PluginInfo:
    """One plugin as ``tunestack plugins`` shows it."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    error: str | None = None
    disabled: bool = False

    @property
    def label(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin '{self.name}' ({dist})"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "methods": self.methods,
            "tasks": self.tasks,
            "error": self.error,
            "disabled": self.disabled,
        }


def create_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with tunestack's hook specs (one per host; never a module global)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


class PluginHost:
    """The loaded plugins, the methods and tasks they registered, and the ones that failed."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.plugins: list[PluginInfo] = []
        self.methods: dict[str, MethodSpec] = {}
        self.method_plugin: dict[str, PluginInfo] = {}
        self.tasks: dict[str, TaskSpec] = {}
        self.task_plugin: dict[str, PluginInfo] = {}

    # -- queries -------------------------------------------------------------------------------

    @property
    def hook(self) -> Any:
        return self.pm.hook

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)

    def describe_unknown_method(self, name: str) -> str:
        """Did-you-mean, the installed methods, and a failed plugin that probably provides it."""
        parts = [f"unknown method '{name}'"]
        close = difflib.get_close_matches(name, list(self.methods), n=3, cutoff=0.6)
        if close:
            parts.append(f"did you mean {' or '.join(repr(c) for c in close)}?")
        for info in self.failed:
            candidates = {info.name, (info.distribution or "").removeprefix("tunestack-")}
            if name in candidates:
                parts.append(f"it is probably provided by {info.label}, which failed to load: {info.error}")
        parts.append("installed methods: " + (", ".join(sorted(self.methods)) or "none"))
        return "; ".join(parts)

    def describe_unknown_task(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.tasks), n=1, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown task '{name}'{hint}; known tasks: {', '.join(sorted(self.tasks))}"

    # -- scoped registration -------------------------------------------------------------------

    @contextmanager
    def activated(self, instances: Sequence[object]) -> Iterator[None]:
        """Register method instances so that hooks call them in the given (stack) order.

        pluggy calls the most recently registered implementation first, so core registers the
        instances in reverse; core, not registration accident, owns the order.
        """
        names = []
        try:
            for instance in reversed(list(instances)):
                names.append(self.pm.register(instance, name=f"method-{id(instance)}"))
            yield
        finally:
            for name in names:
                if name is not None:
                    self.pm.unregister(name=name)

    def scoped_hook(self, instance: object) -> Any:
        """A hook caller that reaches only ``instance`` (for the targeted save/rebuild hooks)."""
        pm = create_plugin_manager()
        pm.register(instance, name="target")
        return pm.hook

    # -- registration --------------------------------------------------------------------------

    def register_plugin(self, obj: object, info: PluginInfo) -> None:
        """Register a plugin object and collect its methods and tasks, isolating failures."""
        try:
            self.pm.register(obj, name=info.name)
            self.pm.check_pending()
        except Exception as error:  # a bad hookimpl signature or an unknown hook name
            self._fail(info, f"invalid hook implementation: {error}", obj)
            return
        info.hooks = sorted(
            caller.name for caller in (self.pm.get_hookcallers(obj) or []) if caller.name.startswith("tunestack_")
        )
        self.plugins.append(info)
        methods: list[MethodSpec] = []
        tasks: list[TaskSpec] = []
        try:
            self._call_registration(obj, "tunestack_register_methods", methods.append)
            self._call_registration(obj, "tunestack_register_tasks", tasks.append)
            for spec in methods:
                _check_method_spec(spec)
                if spec.name in self.methods:
                    other = self.method_plugin[spec.name]
                    raise PluginError(f"method '{spec.name}' is already provided by {other.label}")
            for task in tasks:
                if task.name in self.tasks:
                    raise PluginError(f"task '{task.name}' is already provided by {self.task_plugin[task.name].label}")
        except Exception as error:
            self.plugins.remove(info)
            self._fail(info, str(error), obj)
            return
        for spec in methods:
            self.methods[spec.name] = spec
            self.method_plugin[spec.name] = info
            info.methods.append(spec.name)
        for task in tasks:
            self.tasks[task.name] = task
            self.task_plugin[task.name] = info
            info.tasks.append(task.name)

    def _call_registration(self, obj: object, hook_name: str, sink: Callable[[Any], None]) -> None:
        impl = getattr(obj, hook_name, None)
        if impl is not None and hasattr(impl, hookspecs.PROJECT + "_impl"):
            impl(sink)

    def _fail(self, info: PluginInfo, message: str, obj: object | None = None) -> None:
        if obj is not None and self.pm.is_registered(obj):
            self.pm.unregister(obj)
        info.error = message
        if info not in self.plugins:
            self.plugins.append(info)
        if _strict():
            raise PluginError(f"{info.label} failed to load: {message}")


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").lower() in {"1", "true", "yes"}


def _disabled_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _check_method_spec(spec: MethodSpec) -> None:
    """Reject a malformed registration with a message that names what is wrong."""
    if not isinstance(spec, MethodSpec):
        raise PluginError(f"register() expects a MethodSpec, got {type(spec).__name__}")
    if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
        raise PluginError(f"method name {spec.name!r} must be a non-empty identifier")
    if not (isinstance(spec.options, type) and issubclass(spec.options, Options)):
        raise PluginError(f"method '{spec.name}': options must be a subclass of tunestack.api.Options")
    if spec.options.model_config.get("extra") != "forbid":
        raise PluginError(f"method '{spec.name}': options must reject unknown keys (extra='forbid')")
    if not callable(spec.factory):
        raise PluginError(f"method '{spec.name}': factory is not callable")
    if isinstance(spec.contract, Contract):
        contract = spec.contract
    elif callable(spec.contract):
        try:
            defaults = spec.options()
        except Exception:  # options with required fields: the contract is checked at validation
            return
        contract = spec.contract(defaults)
    else:
        raise PluginError(f"method '{spec.name}': contract must be a Contract or a function of the options")
    if not isinstance(contract, Contract):
        raise PluginError(f"method '{spec.name}': contract function returned {type(contract).__name__}")
    if not contract.phases:
        raise PluginError(f"method '{spec.name}': contract declares no phases")


def _entry_points() -> Iterable[md.EntryPoint]:
    return sorted(md.entry_points(group=GROUP), key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))


def create_host(extra_plugins: Sequence[tuple[str, object]] = (), *, autoload: bool = True) -> PluginHost:
    """Load every installed plugin (plus ``extra_plugins``, used by tests) into a new host."""
    host = PluginHost(create_plugin_manager())
    disabled = _disabled_names()
    if autoload:
        for ep in _entry_points():
            dist_name = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            builtin = dist_name == CORE_DIST
            info = PluginInfo(ep.name, ep.value, dist_name, version, builtin=builtin)
            if (ep.name in disabled or dist_name in disabled) and ep.name not in ESSENTIAL:
                info.disabled = True
                host.plugins.append(info)
                continue
            try:
                obj = ep.load()
            except BaseException as error:  # a plugin's import may even call sys.exit
                if isinstance(error, KeyboardInterrupt):
                    raise
                host._fail(info, f"{type(error).__name__}: {error}")
                continue
            host.register_plugin(obj, info)
    for name, obj in extra_plugins:
        module = getattr(obj, "__name__", type(obj).__name__)
        host.register_plugin(obj, PluginInfo(name, str(module), None, None))
    return host


_default_host: PluginHost | None = None


def default_host() -> PluginHost:
    """The process-wide host the CLI and ``tunestack.run`` use when none is passed."""
    global _default_host
    if _default_host is None:
        _default_host = create_host()
    return _default_host


def reset_default_host() -> None:
    """Forget the cached host (after ``tunestack install`` adds a plugin, and in tests)."""
    global _default_host
    _default_host = None


def plugin_of_module(host: PluginHost, module_name: str) -> PluginInfo | None:
    """The plugin whose package contains ``module_name`` (to name the culprit of an error)."""
    best: PluginInfo | None = None
    for info in host.plugins:
        root = info.module.split(":")[0].split(".")[0]
        if module_name == root or module_name.startswith(root + "."):
            if root == "tunestack" and best is not None:
                continue
            best = info
    return best


def culprit(host: PluginHost, error: BaseException, instances: Sequence[object] = ()) -> str:
    """Name the plugin (and its distribution version) whose code raised ``error``.

    A frame running a method instance's code names the plugin that registered the method;
    otherwise the innermost frame from a plugin's package decides.
    """
    tb = error.__traceback__
    label = None
    known = {id(i): i for i in instances}
    while tb is not None:
        frame = tb.tb_frame
        owner = known.get(id(frame.f_locals.get("self")))
        slot = getattr(owner, "slot", None)
        if slot is not None and slot.method in host.method_plugin:
            label = host.method_plugin[slot.method].label
        else:
            info = plugin_of_module(host, frame.f_globals.get("__name__", ""))
            if info is not None and not info.builtin:
                label = info.label
        tb = tb.tb_next
    return label or "tunestack core"


def options_model_json(options: type[BaseModel]) -> dict[str, Any]:
    """JSON schema of an options model (for docs and ``methods --json``)."""
    return options.model_json_schema()


def module_of(obj: object) -> ModuleType | None:
    return sys.modules.get(getattr(obj, "__module__", "") or "")
