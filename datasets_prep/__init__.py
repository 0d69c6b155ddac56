"""Built-in dataset reorganizers. Importing this package imports every module in it,
so each ``@register_reorganizer`` runs (modules must stay cheap to import)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
