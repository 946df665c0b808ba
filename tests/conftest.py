"""Shared test setup: slow tests (real installed models) are skipped when CI=true."""
import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test on a real model; skipped in CI (CI=true)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
