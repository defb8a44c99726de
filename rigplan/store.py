"""Calibration files: the shipped reference (profiles/calibrations/) and per-GPU fits in the user's data
directory. JSON with provenance, written atomically. Standard library only: `rigplan check` reads these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from rigplan.errors import CalibrationError, ConfigError
from rigplan.estimator.plan import Coefficients
from rigplan.profiles.catalog import PROFILES_DIR

# 2: the allocator's slack as a share of the step's bytes (slack_ratio ...), not of all allocated bytes.
CALIBRATION_SCHEMA_VERSION = 2
REFERENCE_FILE = PROFILES_DIR / "calibrations" / "h100-sxm.json"


def user_dir() -> Path:
    """Where a user's own calibrations live: $RIGPLAN_HOME, else the platform's data directory. A file there
    is refused: calibrations and runs.jsonl would be neither read nor written."""
    if os.environ.get("RIGPLAN_HOME"):
        path, name = Path(os.environ["RIGPLAN_HOME"]).expanduser(), "RIGPLAN_HOME"
    elif sys.platform == "darwin":
        path, name = Path.home() / "Library" / "Application Support" / "rigplan", "rigplan's data directory"
    else:
        path = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "rigplan"
        name = "rigplan's data directory"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name} {path} is a file, not a directory; point RIGPLAN_HOME at a directory "
                          "(created when needed) or move the file")
    return path


def write_calibration(path: Path, coeffs: Coefficients, residuals: dict[str, Any],
                      runs_files: list[str] | None = None, provenance: dict[str, Any] | None = None,
                      probes: list[dict[str, Any]] | None = None) -> None:
    """Write atomically (temp file in the same folder, then os.replace): a crash leaves the old file whole.
    The raw probes go in the file when given (rigplan calibrate), else the files they came from."""
    doc = {"schema_version": CALIBRATION_SCHEMA_VERSION, "coefficients": coeffs.to_dict(),
           "residuals": residuals, "runs_files": runs_files or [], "provenance": provenance or {},
           "probes": probes or []}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_calibration(path: Path) -> tuple[Coefficients, dict[str, Any]]:
    """Coefficients and the whole document; CalibrationError if the file is corrupt or of another version."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("schema_version") != CALIBRATION_SCHEMA_VERSION:
            raise CalibrationError(f"{path}: calibration schema {doc.get('schema_version')!r}, this rigplan reads "
                                   f"{CALIBRATION_SCHEMA_VERSION}; run rigplan calibrate again")
        coeffs = Coefficients.from_dict(doc["coefficients"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CalibrationError(f"{path}: unreadable calibration ({e}); run rigplan calibrate again") from e
    bad = coefficient_problems(coeffs)
    if bad:
        raise CalibrationError(f"{path}: impossible coefficients ({'; '.join(bad)}); run rigplan calibrate again")
    return coeffs, doc


def coefficient_problems(coeffs: Coefficients) -> list[str]:
    """Every fitted value that cannot be: each is a size, a time or a share, so finite and >= 0, and the
    FLOP/s share (mfu) above 0 and at most 1. A negative one once gave "fits with 122.5 GiB to spare" on a
    23.9 GiB card."""
    problems = []
    for f in dataclasses.fields(coeffs):
        v = getattr(coeffs, f.name)
        if isinstance(v, str):
            continue
        ok = isinstance(v, (int, float)) and math.isfinite(v) and (0 < v <= 1 if f.name == "mfu" else v >= 0)
        if not ok:
            problems.append(f"{f.name} = {v!r}")
    return problems


@lru_cache(maxsize=1)
def reference() -> tuple[Coefficients, dict[str, Any]]:
    """The shipped reference calibration, measured on our H100 (raw runs beside it); read once a process
    (`rigplan check` without a GPU asks for it once per catalogue GPU)."""
    return read_calibration(REFERENCE_FILE)


def for_gpu(gpu_id: str) -> tuple[Coefficients, dict[str, Any], bool]:
    """The user's own calibration of this GPU when there is a good one, else the reference.
    The flag says whether the coefficients were measured on this GPU model."""
    own = user_dir() / f"{gpu_id}.json"
    if own.exists():
        try:
            coeffs, doc = read_calibration(own)
            return coeffs, doc, True
        except CalibrationError as e:
            warnings.warn(f"rigplan: ignoring {e} (planning with the reference calibration meanwhile)",
                          stacklevel=2)
    coeffs, doc = reference()
    return coeffs, doc, coeffs.gpu == gpu_id


# Every finished GPU run, appended by `rigplan run` (the caller of the trainer) to this file in the user's data
# directory, next to the calibrations: the plan, what was measured and the data's shape, with provenance, for
# `rigplan calibrate` to learn this machine's own rates from.
RUNS_LOG = "runs.jsonl"


def record_run(path: Path, summary: dict[str, Any], plan_json: str,
               lengths: tuple[list[int], int] | None = None) -> dict[str, Any]:
    """Append one line: a whole line in one write, so a crash leaves earlier lines readable. lengths: the data's
    tokens per example as the plan counted them (a sample, and the number of examples), kept as the quantiles the
    estimate uses, so that `rigplan calibrate` can estimate the run again with the estimator it runs."""
    from rigplan.estimator.plan import ExampleLengths

    row = {"plan": json.loads(plan_json),
           **{k: summary.get(k) for k in ("status", "engine", "gpu", "method", "global_step", "measured",
                                          "predicted", "data", "oom_backoffs", "provenance")}}
    if lengths is not None and lengths[0]:
        q = ExampleLengths.of(lengths[0], count=lengths[1])
        row["lengths"] = {"quantiles": list(q.tokens), "count": q.count}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row
