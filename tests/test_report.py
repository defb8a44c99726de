"""rigplan report: the plots and the CSV from the shipped H100 calibration's recorded runs."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

from click.testing import CliRunner  # noqa: E402

from rigplan.cli import main  # noqa: E402


def test_report_writes_plots_and_csv(tmp_path) -> None:
    r = CliRunner().invoke(main, ["report", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for name in ("memory_predicted_vs_measured.png", "memory_vs_tokens.png", "tokens_per_s_vs_tokens.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    rows = list(csv.DictReader((tmp_path / "probes.csv").open()))
    assert len(rows) >= 60
    counted = [r for r in rows if r["memory_counts"] == "True"]
    worst = max(abs(float(r["predicted_reserved_gib"]) / float(r["measured_reserved_gib"]) - 1) for r in counted)
    assert worst < 0.10
