"""Calibration files: round trip, atomic writes, corrupt or foreign files ignored with a warning."""

from __future__ import annotations

import json
import os

import pytest

from rigplan import store
from rigplan.errors import CalibrationError


def test_round_trip(tmp_path, coeffs) -> None:
    path = tmp_path / "x.json"
    store.write_calibration(path, coeffs, {"max_abs_peak_reserved_err": 0.05}, ["runs.jsonl"], {"date": "2026-11-22"})
    back, doc = store.read_calibration(path)
    assert back == coeffs and doc["provenance"]["date"] == "2026-11-22"


def test_crash_mid_write_keeps_the_old_file(tmp_path, coeffs, monkeypatch) -> None:
    path = tmp_path / "x.json"
    store.write_calibration(path, coeffs, {})
    before = path.read_text()

    def boom(*_a, **_k):
        raise KeyboardInterrupt  # the process dies between writing the temp file and replacing

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_calibration(path, coeffs, {"changed": True})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("content", ["{truncated", json.dumps({"schema_version": 99, "coefficients": {}}), "[]"])
def test_corrupt_or_foreign_file_is_an_error(tmp_path, content) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="calibrat"):
        store.read_calibration(path)


def test_corrupt_user_file_falls_back_to_reference(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RIGPLAN_HOME", str(tmp_path))
    (tmp_path / "rtx-4090.json").write_text("{broken")
    with pytest.warns(UserWarning, match="ignoring"):
        coeffs, _, measured = store.for_gpu("rtx-4090")
    assert coeffs == store.reference()[0] and not measured


def test_reference_is_measured_on_h100_with_provenance() -> None:
    coeffs, doc = store.reference()
    assert coeffs.gpu == "h100-sxm" and doc["provenance"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert doc["provenance"]["date"] and doc["runs_files"]
