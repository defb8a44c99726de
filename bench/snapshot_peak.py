"""What was allocated on the GPU at the highest point of a memory snapshot (bench/capped.py MEM_HISTORY), grouped by
where it was allocated: for a peak that the plan's terms do not explain, e.g. sharding a model FSDP should only ever
hold a layer of.

    python3 bench/snapshot_peak.py SNAPSHOT.pickle[.gz] [--top 12]

Replays the trace's alloc and free events (torch's memory snapshot format,
https://pytorch.org/docs/stable/torch_cuda_memory.html) to find the peak of allocated bytes, then sums the blocks
live at that point by their stack: the innermost frames in accelerate, transformers, peft, bitsandbytes, unsloth,
torch's FSDP or rigplan, which say who asked for the memory.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
from collections import defaultdict

WHO = ("accelerate/", "transformers/", "peft/", "bitsandbytes/", "unsloth", "fsdp/", "rigplan", "trl/", "bench/")


def where(frames: list[dict], depth: int = 4) -> str:
    """The innermost `depth` frames from the libraries that decide what is allocated."""
    picked = [f"{f['filename'].rsplit('site-packages/', 1)[-1]}:{f['line']} {f['name']}" for f in frames
              if any(w in f["filename"] for w in WHO)]
    return " < ".join(picked[:depth]) or (frames[0]["filename"] if frames else "?")


def peak_blocks(trace: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """(peak bytes, event index of the peak, blocks live there by address)."""
    live: dict[int, dict] = {}
    now = peak = at = 0
    best: dict[int, dict] = {}
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > peak:
                peak, at, best = now, i, dict(live)
        elif event["action"] in ("free_completed",) and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    return peak, at, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    opener = gzip.open if args.snapshot.endswith(".gz") else open
    with opener(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    for device, trace in enumerate(snapshot["device_traces"]):
        if not trace:
            continue
        peak, at, blocks = peak_blocks(trace)
        print(f"device {device}: {len(trace)} events, peak {peak / 2**30:.2f} GiB allocated at event {at}")
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for block in blocks.values():
            group = groups[where(block.get("frames", []))]
            group[0] += block["size"]
            group[1] += 1
        for name, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {size / 2**30:7.2f} GiB in {count:5d} blocks: {name}")


if __name__ == "__main__":
    main()
