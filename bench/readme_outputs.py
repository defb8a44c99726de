"""Re-run the CPU commands pasted in README.md and replace their output, so the README shows real output
of today's code. Only `rigplan check|estimate|plan|gpus|models` blocks are refreshed (run, calibrate and
report outputs come from real training and GPU runs; they are left as recorded).

    python bench/readme_outputs.py [--check]   (--check: exit 1 if the README is stale, change nothing)
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
REFRESHED = ("check", "estimate", "plan", "gpus", "models")


def refresh(text: str) -> str:
    out, lines, i = [], text.splitlines(keepends=True), 0
    with tempfile.TemporaryDirectory() as cwd:
        while i < len(lines):
            line = lines[i]
            out.append(line)
            m = re.match(r"\$ rigplan (\S+)(.*)$", line.rstrip("\n"))
            i += 1
            if not m or m.group(1) not in REFRESHED:
                continue
            # the old output runs to the next command or the end of the code block
            j = i
            while j < len(lines) and not lines[j].startswith("$ ") and not lines[j].startswith("```"):
                j += 1
            cmd = ["rigplan", m.group(1), *shlex.split(m.group(2))]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
            out.append(proc.stdout + proc.stderr if (proc.stdout + proc.stderr).endswith("\n")
                       else proc.stdout + proc.stderr + "\n")
            i = j
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    old = README.read_text()
    new = refresh(old)
    if args.check:
        return int(new != old)
    README.write_text(new)
    print("README.md outputs refreshed" if new != old else "README.md outputs already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
