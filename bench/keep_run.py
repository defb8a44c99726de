"""One `rigplan run`'s record for bench/results: its run_summary.json with the plan it trained, the command and the
command that made its data, written as OUT/NAME.json; prints measured against predicted.

    python3 bench/keep_run.py RUN_DIR OUT/NAME.json "COMMAND" "DATA COMMAND"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    run, out, command, data_command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    summary = json.loads((run / "run_summary.json").read_text())
    summary.update(command=command, data_command=data_command, plan=json.loads((run / "plan.json").read_text()))
    out.write_text(json.dumps(summary, indent=2))
    m, p = summary["measured"], summary["predicted"]
    print(out.stem, "reserved", m["peak_reserved_gib"], "vs", p["peak_reserved_gib"], "tok/s", m["tokens_per_s"],
          "vs", p["tokens_per_s"], "nvml peak", m.get("nvml_peak_used_gib"))


if __name__ == "__main__":
    main()
