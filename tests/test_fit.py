"""The fit over the estimator's terms: it reproduces the shipped reference from the recorded H100 runs,
recovers known coefficients, and keeps every recorded run inside the accuracy goals."""

from __future__ import annotations

import dataclasses

import pytest

from rigplan.calibration import fit
from rigplan.calibration.store import reference

GIB = 2**30


@pytest.fixture(scope="module")
def runs(run_files):
    return fit.load_runs(run_files)


def test_reference_is_the_fit_of_the_recorded_runs(runs) -> None:
    shipped, _ = reference()
    coeffs, _ = fit.fit(runs, "h100-sxm", source=shipped.source)
    for f in dataclasses.fields(coeffs):
        got, want = getattr(coeffs, f.name), getattr(shipped, f.name)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), f.name
        else:
            assert got == want, f.name


def test_fit_recovers_coefficients_from_its_own_predictions(runs) -> None:
    """Replace each measured peak and step time by the estimator's prediction with the shipped
    coefficients; the fit must give those coefficients back."""
    shipped, _ = reference()
    synthetic = []
    for r in runs:
        p = fit.predict(r, shipped, "h100-sxm")
        row = dict(r.row, peak_alloc_gib=p["peak_alloc_gib"], peak_reserved_gib=p["peak_reserved_gib"],
                   step_s=r.setup.tokens / p["tok_per_s"], tok_per_s=p["tok_per_s"])
        synthetic.append(fit.Run(r.model, r.setup, row))
    coeffs, res = fit.fit(synthetic, "h100-sxm", source="synthetic")
    assert res["max_abs_peak_reserved_err"] < 0.02
    assert coeffs.transient_per_intermediate == pytest.approx(shipped.transient_per_intermediate, rel=0.05)


def test_recorded_runs_cover_the_required_shapes(runs) -> None:
    train = [r for r in runs if r.setup.checkpointing == "unsloth"]
    sizes = {r.model.id.split("-L")[0] for r in train}
    assert {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"} <= sizes
    assert {r.setup.method for r in train} == {"lora", "qlora"} and len(train) >= 12
