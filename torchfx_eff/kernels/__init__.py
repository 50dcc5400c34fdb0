"""Kernel families. Each module registers its implementations on import; nothing lists them centrally."""
import importlib
import pkgutil

from .registry import Implementation, Replacement, implementations, names, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Implementation", "Replacement", "implementations", "names", "register"]
