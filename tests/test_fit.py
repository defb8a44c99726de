"""The fit over the estimator's terms: it reproduces the shipped reference from the recorded H100 runs,
recovers known coefficients, and keeps every recorded run inside the accuracy goals."""

from __future__ import annotations

import dataclasses

import pytest

from rigplan.calibration import fit
from rigplan.store import reference

GIB = 2**30


FLOOR_TERMS = ("step_overhead_s", "layer_overhead_s", "nockpt_layer_overhead_s", "qlora_layer_overhead_s",
               "offload_s_per_gb")


@pytest.fixture(scope="module")
def runs(run_files):
    return fit.load_runs(run_files)


def test_reference_is_the_fit_of_the_recorded_runs(runs) -> None:
    shipped, _ = reference()
    coeffs, _ = fit.fit(runs, "h100-sxm", source=shipped.source, floor_fit="minimax")
    for f in dataclasses.fields(coeffs):
        got, want = getattr(coeffs, f.name), getattr(shipped, f.name)
        if isinstance(want, float):  # the minimax floor is an LP's vertex: HiGHS versions may differ a little
            rel = 1e-3 if f.name in FLOOR_TERMS else 1e-6
            assert got == pytest.approx(want, rel=rel, abs=1e-9), f.name
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


def test_leftover_of_an_earlier_job_is_subtracted() -> None:
    row = {"model": "llama-3.1-8b-L2", "method": "lora", "rank": 16, "batch": 2, "seq": 2048,
           "peak_alloc_gib": 5.0, "peak_reserved_gib": 5.5, "after_load_gib": 4.0, "base_gib": 4.2,
           "start_alloc_gib": 0.25, "start_reserved_gib": 0.5, "context_gib": 1.3}
    r = fit.parse_run(row).row
    left = 0.25 - fit.FRESH_PROCESS_ALLOC_GIB  # a fresh process's own 32 MiB is not a leftover
    assert (r["peak_alloc_gib"], r["after_load_gib"], r["base_gib"]) == pytest.approx((5 - left, 4 - left, 4.2 - left))
    assert r["peak_reserved_gib"] == pytest.approx(5.5 - (0.5 - fit.FRESH_PROCESS_RESERVED_GIB))
    fresh = dict(row, start_alloc_gib=fit.FRESH_PROCESS_ALLOC_GIB, start_reserved_gib=fit.FRESH_PROCESS_RESERVED_GIB)
    assert fit.parse_run(fresh).row["peak_alloc_gib"] == 5.0
    assert r["context_gib"] == 1.3 and row["peak_alloc_gib"] == 5.0  # context is NVML - reserved: no leftover in it
    assert fit.parse_run({k: v for k, v in row.items() if not k.startswith("start_")}).row["peak_alloc_gib"] == 5.0


def test_prior_keeps_what_one_architecture_cannot_separate(runs) -> None:
    """`rigplan calibrate` probes one architecture: its per-token terms (a layer's transient bytes per
    hidden and per MLP unit, the logits' per vocabulary entry) all scale with tokens alone. Fitted toward
    the reference, the Llama-3.1-8B runs must still predict the other architectures' memory; fitted
    without it, the split is arbitrary."""
    shipped, _ = reference()
    llama = [r for r in runs if r.model.id.startswith("llama-3.1-8b") and r.setup.checkpointing == "unsloth"]
    others = [r for r in runs if r.model.id.split("-L")[0] in ("qwen2.5-7b", "mistral-7b", "llama-3.2-1b")
              and r.setup.checkpointing == "unsloth" and r.row.get("clean_load", True)]
    coeffs, _ = fit.fit(llama, "h100-sxm", source="test", prior=shipped)
    res = fit.residuals(others, coeffs, "h100-sxm")
    assert res["max_abs_peak_reserved_err"] < 0.07
    # Terms no run exercised (checkpointing off) are the prior's, as they were.
    assert coeffs.nockpt_per_hidden == shipped.nockpt_per_hidden
    assert coeffs.nockpt_layer_overhead_s == shipped.nockpt_layer_overhead_s
    # A prior does not override what the runs do measure: the H100 runs fitted toward a prior twice the
    # reference land next to the reference, not the prior.
    doubled = dataclasses.replace(shipped, **{n: 2 * getattr(shipped, n) for n in fit.MEMORY_COEFFS_CKPT})
    refit, _ = fit.fit(runs, "h100-sxm", source="test", prior=doubled)
    assert refit.step_fixed_bytes + 4096 * 2048 * (refit.transient_per_hidden + 3.5 * refit.transient_per_intermediate) \
        == pytest.approx(shipped.step_fixed_bytes + 4096 * 2048 * (shipped.transient_per_hidden
                                                                   + 3.5 * shipped.transient_per_intermediate), rel=0.05)


def test_minimax_centres_a_band_that_least_squares_does_not() -> None:
    """Times from a known floor, each run 10% slow or fast as hosts are, the fast ones twice as many: the
    minimax fit finds the floor back and a 10% band; least squares leans to the majority."""
    truth = [0.01, 0.007]
    rows = [[1.0, layers] for layers in (16, 16, 28, 28, 32, 32)]
    skew = [1.1, 0.9, 0.9, 1.1, 0.9, 0.9]
    y = [(truth[0] + truth[1] * r[1]) * k for r, k in zip(rows, skew)]
    mm = fit._solve_minimax(rows, y)
    worst = max(abs(yi / (mm[0] + mm[1] * r[1]) - 1) for r, yi in zip(rows, y))
    assert worst == pytest.approx(0.1, rel=1e-3) and mm == pytest.approx(truth, rel=1e-3)
    ls = fit._solve(rows, y)
    assert max(abs(yi / (ls[0] + ls[1] * r[1]) - 1) for r, yi in zip(rows, y)) > worst


def test_generic_path_runs_are_compared_not_fitted(runs) -> None:
    """Phi-3.5 trains through Unsloth's generic path: its runs are in the residuals, not in the fit."""
    from rigplan.profiles.catalog import unsloth_generic_path

    generic = [r for r in runs if unsloth_generic_path(r.model)]
    assert generic
    with_them, res = fit.fit(runs, "h100-sxm", source="x", floor_fit="minimax")
    without, _ = fit.fit([r for r in runs if r not in generic], "h100-sxm", source="x", floor_fit="minimax")
    assert with_them == without
    assert {t["run"] for t in res["runs"]} >= {r.label for r in generic}
