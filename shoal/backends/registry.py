"""Which backends exist and which one `--device` means: the built-ins, plus plugins that
packages declare under the entry-point group `shoal.backends`.

An entry point loads to a Backend subclass or to a zero-argument callable returning a Backend.
A plugin whose backend reuses a built-in name replaces the built-in (a vendor's own backend for
its chip wins); a plugin that fails to load is skipped with a warning and never breaks shoal.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

import torch

from shoal.backends.base import Backend
from shoal.backends.cpu import CpuBackend
from shoal.backends.cuda import CudaBackend
from shoal.backends.mps import MpsBackend
from shoal.backends.npu import NpuBackend
from shoal.backends.xpu import XpuBackend
from shoal.errors import DeviceError

ENTRY_POINT_GROUP = "shoal.backends"

# Other names people type for a device family; each maps to a registry name.
_ALIASES = {"rocm": "cuda", "hip": "cuda", "ascend": "npu"}

_backends: dict[str, Backend] = {}
_plugin_names: set[str] = set()  # names registered from entry points; reload_entry_points() drops them
_entry_points_scanned = False


def register_backend(backend: type[Backend] | Backend) -> Backend:
    """Add a backend (a class, instantiated with no arguments, or an instance) and return the instance.

    A backend with the name of one already registered replaces it.
    """
    instance = backend() if isinstance(backend, type) else backend
    if not isinstance(instance, Backend):
        raise TypeError(f"register_backend expects a Backend subclass or instance, got {backend!r}")
    name = instance.name
    if not isinstance(name, str) or not name or name != name.lower() or ":" in name or name == "auto":
        raise ValueError(
            f"backend name {name!r} is not usable with --device: give the Backend subclass a lowercase "
            "`name` without ':' (and not 'auto')"
        )
    _backends[name] = instance
    _plugin_names.discard(name)
    return instance


def unregister_backend(name: str) -> None:
    """Forget a backend (tests and plugins that clean up after themselves use this)."""
    _backends.pop(name, None)
    _plugin_names.discard(name)


def _scan_entry_points() -> None:
    global _entry_points_scanned
    _entry_points_scanned = True
    try:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a damaged dist-info elsewhere on sys.path must not stop shoal
        warnings.warn(f"shoal: could not read the {ENTRY_POINT_GROUP!r} entry points: {exc!r}", RuntimeWarning)
        return
    for entry_point in entry_points:
        try:
            loaded = entry_point.load()
            instance = loaded() if callable(loaded) else loaded  # a class is callable too
            if not isinstance(instance, Backend):
                raise TypeError(f"it loads {loaded!r}, which is neither a Backend subclass nor returns a Backend")
            register_backend(instance)
        except Exception as exc:
            warnings.warn(
                f"shoal: skipping backend plugin {entry_point.name!r} ({entry_point.value}) declared under "
                f"{ENTRY_POINT_GROUP!r}: {exc!r}. Fix or uninstall the package that declares it.",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        _plugin_names.add(instance.name)


def reload_entry_points() -> list[Backend]:
    """Forget plugin backends and scan the entry points again (after installing a plugin at runtime).

    Built-ins a plugin had replaced come back first, so an uninstalled plugin leaves no trace.
    """
    for name in list(_plugin_names):
        unregister_backend(name)
    _register_builtins(replace=False)
    _scan_entry_points()
    return list_backends()


def _ensure_scanned() -> None:
    if not _entry_points_scanned:
        _scan_entry_points()


def list_backends() -> list[Backend]:
    """Every known backend, present here or not, highest priority first."""
    _ensure_scanned()
    return sorted(_backends.values(), key=lambda b: -b.priority)  # sorted() is stable: ties keep registration order


def _is_available(backend: Backend) -> bool:
    try:
        return bool(backend.is_available())
    except Exception as exc:  # a plugin's broken probe means "not here", not a crash
        warnings.warn(f"shoal: backend {backend.name!r} failed its availability check: {exc!r}", RuntimeWarning)
        return False


def available_backends() -> list[Backend]:
    """The backends present in this process, highest priority first."""
    return [b for b in list_backends() if _is_available(b)]


def _lookup(name: str) -> Backend:
    _ensure_scanned()
    if name not in _backends:
        name = _ALIASES.get(name, name)  # a registered name always wins over an alias
    if name not in _backends:
        _scan_entry_points()  # a plugin may have been installed since the last scan
    if name not in _backends:
        known = ", ".join(b.name for b in list_backends())
        raise DeviceError(
            f"unknown device {name!r}; shoal knows: {known} (or 'auto'). "
            f"If {name!r} comes from a plugin, install the package that declares it under {ENTRY_POINT_GROUP!r}."
        )
    return _backends[name]


def _auto() -> Backend:
    available = available_backends()
    if not available:
        known = ", ".join(b.name for b in list_backends())
        raise DeviceError(f"no device is available (known: {known}); register a backend that works here")
    return available[0]


def parse_device(spec: str | torch.device | None = None) -> tuple[Backend, int]:
    """Turn a `--device` value ("auto", "cpu", "cuda:1", a torch.device) into (backend, index).

    Raises DeviceError, saying what to do instead, for an unknown name, an absent device, or an
    index past the visible devices.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text in ("", "auto"):
        return _auto(), 0
    name, colon, index_text = text.partition(":")
    index = 0
    if colon:
        if not index_text.isdigit():
            raise DeviceError(f"device {spec!r} is malformed; write NAME or NAME:INDEX, for example 'cuda:1'")
        index = int(index_text)
    backend = _lookup(name)
    if not _is_available(backend):
        present = ", ".join(b.name for b in available_backends()) or "none"
        raise DeviceError(
            f"device {backend.name!r} is not present here: {backend.absence_reason()}. "
            f"Available here: {present}; pass one of those to --device, or 'auto'."
        )
    count = backend.device_count()
    if index >= count:
        env = backend.visible_devices_env
        shown = f" ({env}={os.environ[env]!r})" if env and env in os.environ else ""
        choices = f"'{backend.name}' or '{backend.name}:0'" if count == 1 else f"an index from 0 to {count - 1}"
        raise DeviceError(
            f"device {spec!r} asks for {backend.name} index {index}, but only {count} {backend.name} "
            f"device(s) are visible{shown}; use {choices}."
        )
    return backend, index


def get_backend(name: str | None = None) -> Backend:
    """The backend `name` selects ("cuda", "cuda:1", ...); None or "auto" picks the best available one."""
    return parse_device(name)[0]


def _register_builtins(replace: bool = True) -> None:
    # Registration order breaks priority ties: cuda, then npu, then xpu.
    for cls in (CudaBackend, NpuBackend, XpuBackend, MpsBackend, CpuBackend):
        if replace or cls.name not in _backends:
            register_backend(cls)


_register_builtins()
