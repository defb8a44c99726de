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


@pytest.fixture(scope="session")
def toy_llama_and_data():
    """Builds, in a folder, a toy-width Llama and examples: what the multi-process CPU tests train on."""
    return _toy_llama_and_data


def _toy_llama_and_data(folder: Path, examples: int) -> tuple[Path, Path]:
    """A toy-width Llama replica built from profile facts and a small synthetic Alpaca file (each output continues
    its instruction's words): what the multi-process CPU tests train on."""
    import json

    from rigplan.calibration.replica import build_replica, toy
    from rigplan.profiles.catalog import resolve_model

    build_replica(toy(resolve_model("llama-3.2-1b")), folder / "model", dtype="float32", init_std=0.2)
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"w{i} w{i + 1}", "output": " ".join(
        f"w{i + k}" for k in range(2, 12))}) for i in range(examples)) + "\n")
    return folder / "model", data
