"""What `make setup` leaves in the virtual environment."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="not running in the project's .venv (made by `make setup`)")
@pytest.mark.parametrize("package", ["mlflow", "dvc", "prefect", "pandas"])
def test_installed_packages_are_byte_compiled(package):
    """Every stage, dvc and mlflow call is a new process: without .pyc files (uv writes none
    unless asked, and PYTHONDONTWRITEBYTECODE stops Python writing them later) each one
    compiles these packages from source again, seconds per process."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None
    cached = Path(importlib.util.cache_from_source(spec.origin))
    assert cached.exists(), f"{cached} missing: install with `uv pip install --compile-bytecode`"
