"""Loading the repository's scripts (benchmarks/, examples/), which are not packages, from their paths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """Import the script at ``path`` as module ``name`` (also registered in ``sys.modules``).

    Registering it lets dataclasses resolve their annotations through ``sys.modules``, and lets a script import its
    siblings' names once it has put its own folder on ``sys.path``.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
