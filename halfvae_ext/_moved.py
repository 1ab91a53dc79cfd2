"""The old import paths of the modules that moved into ``halfvae_ext.ica``: importing one gives
the module at its new place (the same module object), so code written against the flat layout
keeps working. ``halfvae_ext.experiments``, split in two, is a module of its own."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "halfvae_ext.estimator": "halfvae_ext.ica.estimator",
    "halfvae_ext.recipe": "halfvae_ext.ica.recipe",
    "halfvae_ext.restarts": "halfvae_ext.ica.restarts",
    "halfvae_ext.preprocessing": "halfvae_ext.ica.preprocessing",
    "halfvae_ext.param_validation": "halfvae_ext.ica.param_validation",
}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names and loads them as the new modules."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just set the module's __spec__ to the old name's: give it its
        # own back (pickle, reload and tools read it).
        module.__spec__ = self._own_spec


if not any(isinstance(f, _OldPath) for f in sys.meta_path):
    sys.meta_path.append(_OldPath())
