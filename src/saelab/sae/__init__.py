"""SAE architectures. Importing this package registers every built-in architecture: each module of
this package (and the baselines) registers its own with `@register`, so adding one is adding a file."""

import importlib
import pkgutil

import saelab.baselines  # noqa: F401  (PCA, ICA, NMF, dictionary learning)
from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput
from saelab.sae.registry import create, get_class, list_architectures, make_config, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "SAE",
    "SAEConfig",
    "StepContext",
    "TrainOutput",
    "create",
    "get_class",
    "list_architectures",
    "make_config",
    "register",
]
