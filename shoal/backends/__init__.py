"""Device backends: one file per device family behind the small Backend interface, and a registry
that picks one for `--device`. Nothing outside this package names a device family.
"""

from shoal.backends.base import Backend, MemoryInfo, ThroughputProfile
from shoal.backends.registry import (
    available_backends,
    get_backend,
    list_backends,
    parse_device,
    register_backend,
    reload_entry_points,
    unregister_backend,
)

__all__ = [
    "Backend",
    "MemoryInfo",
    "ThroughputProfile",
    "available_backends",
    "get_backend",
    "list_backends",
    "parse_device",
    "register_backend",
    "reload_entry_points",
    "unregister_backend",
]
