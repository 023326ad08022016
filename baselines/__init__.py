"""Baseline methods, registered on import: every module of this package is imported, so that a
new method is its file (plus its docs page and tests), with nothing to add here."""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
