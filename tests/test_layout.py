"""The package layout's dependency rule: the core never imports Lightning."""

from __future__ import annotations

import json
import subprocess
import sys

CORE_MODULES = (
    "gmar_lightning",
    "gmar_lightning.tokens",
    "gmar_lightning.capture",
    "gmar_lightning.model_state",
    "gmar_lightning.mixing",
    "gmar_lightning.families",
    "gmar_lightning.resolve",
    "gmar_lightning.readout",
    "gmar_lightning.classifiers",
    "gmar_lightning.methods",
    "gmar_lightning.options",
    "gmar_lightning.engine",
    "gmar_lightning.explanation",
    "gmar_lightning.trajectory",
    "gmar_lightning.input_recipe",
    "gmar_lightning.model_loading",
    "gmar_lightning.render",
    "gmar_lightning.heads",
    "gmar_lightning.metrics",
    "gmar_lightning.report",
)


def _modules_loaded_by(imports: tuple[str, ...]) -> list[str]:
    """Module names in ``sys.modules`` after importing ``imports`` in a fresh interpreter."""
    script = "import importlib, json, sys\n"
    script += "".join(f"importlib.import_module({name!r})\n" for name in imports)
    script += "print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def _lightning_modules(names: list[str]) -> list[str]:
    return [name for name in names if name.split(".")[0] in ("lightning", "pytorch_lightning")]


def test_the_core_imports_no_lightning() -> None:
    loaded = _modules_loaded_by(CORE_MODULES)
    assert "gmar_lightning.engine" in loaded
    assert _lightning_modules(loaded) == []


def test_the_callback_does_import_lightning() -> None:
    # The check above can see Lightning when it is loaded: the callback package brings it in.
    assert "lightning.pytorch" in _lightning_modules(_modules_loaded_by(("gmar_lightning.callback",)))
