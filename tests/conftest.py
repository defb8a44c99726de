"""Shared fixtures: the recorded H100 runs (real measurements, provenance in each row and in
profiles/calibrations/h100-runs/README.md) and the shipped reference coefficients."""

from __future__ import annotations

from pathlib import Path

import pytest

from rigplan.profiles.catalog import PROFILES_DIR

RUNS_DIR = PROFILES_DIR / "calibrations" / "h100-runs"


@pytest.fixture(scope="session")
def run_files() -> list[Path]:
    return sorted(RUNS_DIR.glob("*.jsonl"))


@pytest.fixture(scope="session")
def coeffs():
    from rigplan.store import reference

    return reference()[0]
