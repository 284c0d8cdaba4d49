"""Shared fixtures. Third-party entry-point plugins are not loaded under tests unless a test
asks for them (LBW_POLICY_LOAD_PLUGINS="")."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("LBW_POLICY_LOAD_PLUGINS", "")

import pytest  # noqa: E402
import torch  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
POLICIES = ROOT / "policies"


@pytest.fixture
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture
def registry():
    from lbw_policy.plugins import get_registry

    return get_registry()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
