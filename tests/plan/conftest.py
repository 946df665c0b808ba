"""Fixtures shared by the budget tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_sensitivity(monkeypatch):
    """Fail the test if any sensitivity work starts (building the float model or estimating costs)."""
    import bitsmith.plan.sensitivity as sensitivity

    def forbidden(*args, **kwargs):
        raise AssertionError("the sensitivity pass ran")

    monkeypatch.setattr(sensitivity, "float_model", forbidden)
    monkeypatch.setattr(sensitivity, "estimate_sensitivity", forbidden)
