"""Test-session setup shared by every test module."""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs ~8 ms per parallel op on small shared VMs; passive waiting halves the suite's
# time there and changes no result. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing in the tests may reach a W&B server.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
