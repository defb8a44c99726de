"""Regenerate every output README.md shows from today's code, so the README never shows stale output.

    python3 bench/readme_outputs.py           rewrite README.md's output blocks in place
    python3 bench/readme_outputs.py --check   change nothing; exit 1 if a block is stale

A block runs from a marker line to `<!-- /output -->`. `<!-- output: rigplan ARGS -->` becomes a fenced block
with `$ rigplan ARGS` and what that command prints (stdout and stderr, run through this Python in an empty
directory with an empty RIGPLAN_HOME, so no stored calibration or local file shows); the command must exit 0,
or N with `<!-- output exit N: rigplan ARGS -->`. `<!-- output: accuracy -->` becomes the accuracy table,
from bench/accuracy.py's compare() over the recorded runs and the shipped reference calibration.
A command that exits otherwise (an option renamed, say) stops the script with exit code 2: fix the marker.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- output(?: exit (\d+))?: (.+?) -->")
END = "<!-- /output -->"
# Full-depth 7-8B runs recorded on other H100 machines right after `rigplan calibrate`; the reference never saw them.
VALIDATION_RUNS = "bench/results/calibrate-h100/validate-*.jsonl"


class StaleMarker(Exception):
    """A marker whose command no longer runs as the README says."""


def run_command(command: str, expect_rc: int) -> str:
    """A fenced block: the command as typed, then what it printed."""
    args = shlex.split(command)
    if not args or args[0] != "rigplan":
        raise StaleMarker(f"only rigplan commands are run, not {command!r}")
    with tempfile.TemporaryDirectory() as cwd:
        env = {**os.environ, "RIGPLAN_HOME": cwd, "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, "-m", "rigplan", *args[1:]], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != expect_rc:
        raise StaleMarker(f"`{command}` exited {proc.returncode}, the README expects {expect_rc}:\n{proc.stdout}")
    return f"```\n$ {command}\n{proc.stdout.rstrip()}\n```\n"


def error_range(errors: list[float]) -> str:
    """Signed errors as 'lowest to highest (runs)'."""
    if not errors:
        return "-"
    lo, hi = min(errors), max(errors)
    return (f"{lo:+.1%}" if lo == hi else f"{lo:+.1%} to {hi:+.1%}") + f" ({len(errors)})"


def accuracy_table() -> str:
    """Estimate vs measured, by group of runs: the range of signed errors (estimate / measured - 1)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import accuracy  # bench/accuracy.py, the same comparison `python bench/accuracy.py` prints row by row
    from rigplan.calibration import fit

    coeffs, _ = accuracy.store.read_calibration(accuracy.store.REFERENCE_FILE)
    reference = accuracy.compare(fit.load_runs(sorted(accuracy.RUNS_DIR.glob("*.jsonl"))), coeffs, coeffs.gpu)
    validation = accuracy.compare(fit.load_runs(sorted(ROOT.glob(VALIDATION_RUNS))), coeffs, coeffs.gpu)
    import issue17_rows  # bench/issue17_rows.py: the H200 rows that check the families issue 17 added

    checks = [{**r, "beyond_run_gib": issue17_rows.without_autocast_gib(r)} for _, r in issue17_rows.checks()]
    issue17 = accuracy.compare(fit.runs_from_rows(checks), coeffs, coeffs.gpu)
    # speed also on QLoRA probes without autocast, which keep more memory than a run but run at its speed
    timed = fit.runs_from_rows([r for _, r in issue17_rows.speed_checks()])
    issue17_speed = accuracy.compare(timed, coeffs, coeffs.gpu)
    groups = [
        ("runs behind the reference (Llama, Mistral, Qwen; 1B-70B, some at reduced depth)",
         [r for r in reference if not r["unsloth_generic_path"]], None),
        ("Phi-3.5-mini, 16-bit LoRA probed without the autocast runs use (generic path: compared, not fitted)",
         [r for r in reference if r["unsloth_generic_path"]], None),
        ("full-depth 7-8B runs on other H100 machines, never fitted (`calibrate-h100/validate-*`)", validation, None),
        ("H200: mixture-of-experts and generic-path families, 4-48 layers, rows no term was fitted on, trained as "
         "runs are or compared as probed (speed: and QLoRA probes without autocast; `bench/issue17_rows.py`)",
         issue17, issue17_speed),
    ]
    lines = ["| runs (H100 unless said) | peak reserved (runs) | tok/s, GPU-bound (runs) | tok/s, host-bound (runs) |",
             "|---|--:|--:|--:|"]
    for name, rows, timed in groups:
        mem = [r["reserved_err"] for r in rows if r["reserved_err"] is not None]
        speed_rows = timed or rows
        gpu = [r["tok_per_s_err"] for r in speed_rows if r["tok_per_s_err"] is not None and not r["host_bound"]]
        host = [r["tok_per_s_err"] for r in speed_rows if r["tok_per_s_err"] is not None and r["host_bound"]]
        lines.append(f"| {name} | {error_range(mem)} | {error_range(gpu)} | {error_range(host)} |")
    return "\n".join(lines) + "\n"


def render(what: str, expect_rc: int) -> str:
    return accuracy_table() if what == "accuracy" else run_command(what, expect_rc)


def refresh(text: str) -> tuple[str, list[str]]:
    """The README with every output block regenerated, and the markers whose block changed."""
    lines, out, stale, i = text.splitlines(keepends=True), [], [], 0
    while i < len(lines):
        out.append(lines[i])
        m = MARKER.fullmatch(lines[i].strip())
        i += 1
        if not m:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise StaleMarker(f"{m.group(0)} has no {END} after it")
        new = render(m.group(2), int(m.group(1) or 0))
        if "".join(lines[i:end]) != new:
            stale.append(m.group(2))
        out += [new, lines[end]]
        i = end + 1
    return "".join(out), stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale; change nothing")
    args = parser.parse_args(argv)
    try:
        new, stale = refresh(README.read_text())
    except StaleMarker as e:
        print(f"readme_outputs: {e}", file=sys.stderr)
        return 2
    if args.check:
        for what in stale:
            print(f"stale: {what} (run python3 bench/readme_outputs.py)")
        return int(bool(stale))
    if stale:
        README.write_text(new)
    print(f"README.md: {len(stale)} output block(s) regenerated" if stale else "README.md: outputs current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
