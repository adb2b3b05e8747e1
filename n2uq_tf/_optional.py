"""Optional dependencies: the error that names the package (and the extra) a feature needs."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependencyError(ImportError):
    """A feature needs a package that is not installed; the message says what to pip install."""


def require(module: str, feature: str, install: str) -> ModuleType:
    """Imports ``module``, or raises MissingDependencyError: "<feature> needs <install>"."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(f"{feature} needs {install}", name=error.name) from error
