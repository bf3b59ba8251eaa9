"""Load a reference algorithm's module straight from its bundle source directory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REFERENCE = Path(__file__).resolve().parents[3] / "provisioning" / "reference"


def load(service: str, module: str) -> ModuleType:
    """Import ``provisioning/reference/<service>/<module>.py`` under a private name."""
    name = f"_ref_{service.replace('-', '_')}_{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REFERENCE / service / f"{module}.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
