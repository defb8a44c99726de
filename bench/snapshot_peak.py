"""What was allocated on the GPU at the highest point of a memory snapshot (bench/capped.py MEM_HISTORY), grouped by
where it was allocated: for a peak that the plan's terms do not explain, e.g. sharding a model FSDP should only ever
hold a layer of.

    python3 bench/snapshot_peak.py SNAPSHOT.pickle[.gz] [--top 12]

Replays the trace's alloc and free events (torch's memory snapshot format,
https://pytorch.org/docs/stable/torch_cuda_memory.html) to find the peak of allocated bytes, then sums the blocks
live at that point by their stack: the innermost frames in accelerate, transformers, peft, bitsandbytes, unsloth,
torch's FSDP or rigplan, which say who asked for the memory.

    python3 bench/snapshot_peak.py SNAPSHOT.pickle.gz --reserved   (a trace from the start: capped.py MEM_HISTORY_AT)

Where reserved memory beyond the allocated peak comes from: replays the segments mapped as well (segment_map,
segment_alloc, their unmap and free) to the last time the large pool's reserved memory grew (requests over 1 MiB; the
small pool's segments are its own), and lists the request that grew it and the free holes inside the large pool's
reserved memory then, each with the stack of the largest block freed there since it was mapped: the free space the
request did not fit in.
"""

from __future__ import annotations

import argparse
import bisect
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


def subtract(intervals: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Sorted, disjoint [start, end) intervals less [start, end)."""
    out = []
    for a, b in intervals:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges merged where they touch or overlap, sorted."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


MAPS = ("segment_map", "segment_alloc")
UNMAPS = ("segment_unmap", "segment_free")


def epochs(trace: list[dict]) -> list[tuple[int, int]]:
    """The trace cut where reserved memory was given back (torch.cuda.empty_cache: the probe does it before each
    shape), as [start, end) event ranges: each one's growth is its own."""
    cuts = [i + 1 for i, e in enumerate(trace) if e["action"] in UNMAPS
            and (i + 1 == len(trace) or trace[i + 1]["action"] not in UNMAPS)]
    bounds = [0, *cuts, len(trace)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


SMALL_REQUEST = 1 << 20  # torch's kSmallSize: requests up to 1 MiB come from the small pool, in segments of its own


def large_pool_maps(trace: list[dict]) -> set[int]:
    """The indices of the map events made for a request over SMALL_REQUEST (the large pool's): the alloc after each
    run of maps is the request it was made for."""
    large, run = set(), []
    for i, event in enumerate(trace):
        if event["action"] in MAPS:
            run.append(i)
        elif event["action"] == "alloc" and run:
            if event["size"] > SMALL_REQUEST:
                large.update(run)
            run = []
    return large


def reserved_growth(trace: list[dict], start: int = 0, end: int | None = None,
                    large: set[int] | None = None) -> dict:
    """The last moment the large pool's reserved memory grew to its highest (within trace[start:end]), replayed from
    the trace (which must start before the first allocation it holds: capped.py MEM_HISTORY_AT=exit): its reserved
    bytes after it, the bytes allocated from it before, the allocation request that grew it, and the free holes in
    its reserved memory just before, largest first, each with the largest block freed inside it since that memory was
    last mapped (its size and event). The small pool (requests up to 1 MiB, segments of their own) is left out: a
    request there grows its own segments whatever the large pool holds free. Under expandable segments the hole at a
    segment's end is the start of the request's space, the others are what it did not fit in. `large`: the trace's
    large_pool_maps, where the caller replays several stretches of one trace."""
    large = large_pool_maps(trace) if large is None else large

    def change(i: int) -> int:
        event = trace[i]
        if event["action"] in MAPS:
            return event["size"] if i in large else 0
        return -event["size"] if event["action"] in UNMAPS and in_ranges(mapped_large, event) else 0

    end = len(trace) if end is None else end
    mapped_large: list[tuple[int, int]] = []  # the large pool's mapped ranges, to tell whose an unmap is
    total = 0
    for i in range(end):  # first pass: where the large pool's reserved memory reached its highest for the last time
        if i == start:
            top, at = total, None
        total += change(i)
        action, addr = trace[i]["action"], trace[i].get("addr")
        if action in MAPS and i in large:
            mapped_large = merged([*mapped_large, (addr, addr + trace[i]["size"])])
        elif action in UNMAPS:
            mapped_large = subtract(mapped_large, addr, addr + trace[i]["size"])
        if i >= start and action in MAPS and i in large and total >= top:
            top, at = total, i
    if at is None:
        return {"reserved": top, "allocated": None, "request": None, "holes": []}
    first = at  # the growth: the maps in a row that end there, for one request
    while first > 0 and trace[first - 1]["action"] in MAPS:
        first -= 1
    mapped: list[tuple[int, int]] = []
    live: dict[int, dict] = {}
    freed: dict[int, dict] = {}
    for i, event in enumerate(trace[:first]):
        action, addr = event["action"], event.get("addr")
        if action in MAPS and i in large:
            mapped = merged([*mapped, (addr, addr + event["size"])])
        elif action in UNMAPS:
            mapped = subtract(mapped, addr, addr + event["size"])
            freed = {a: blk for a, blk in freed.items() if not addr <= a < addr + event["size"]}
        elif action == "alloc" and event["size"] > SMALL_REQUEST:
            live[addr] = event
        elif action == "free_completed" and addr in live:
            freed[addr] = live.pop(addr)
    holes, blocks, j = [], sorted((addr, addr + blk["size"]) for addr, blk in live.items()), 0
    for a, b in mapped:  # one sweep over the blocks, in address order, inside each reserved range
        cursor = a
        while j < len(blocks) and blocks[j][0] < b:
            if blocks[j][0] > cursor:
                holes.append((cursor, blocks[j][0]))
            cursor, j = max(cursor, blocks[j][1]), j + 1
        if cursor < b:
            holes.append((cursor, b))
    request = next((e for e in trace[at + 1:] if e["action"] == "alloc"), None)
    addrs = sorted(freed)
    listed = []
    for a, b in sorted(holes, key=lambda h: h[0] - h[1]):
        inside = [freed[x] for x in addrs[bisect.bisect_left(addrs, a):bisect.bisect_left(addrs, b)]]
        listed.append({"size": b - a, "largest_freed": max(inside, key=lambda blk: blk["size"], default=None)})
    return {"reserved": top, "allocated": sum(blk["size"] for blk in live.values()), "request": request,
            "holes": listed}


def in_ranges(ranges: list[tuple[int, int]], event: dict) -> bool:
    """Whether the event's [addr, addr + size) lies inside one of the sorted, disjoint ranges."""
    k = bisect.bisect_right(ranges, (event["addr"], float("inf"))) - 1
    return k >= 0 and ranges[k][0] <= event["addr"] and event["addr"] + event["size"] <= ranges[k][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--reserved", action="store_true", help="where reserved memory beyond allocated comes from")
    args = parser.parse_args()
    opener = gzip.open if args.snapshot.endswith(".gz") else open
    with opener(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    for device, trace in enumerate(snapshot["device_traces"]):
        if not trace:
            continue
        if args.reserved:
            large = large_pool_maps(trace)
            for start, end in epochs(trace):
                grown = reserved_growth(trace, start, end, large)
                request = grown["request"]
                if request is None:
                    continue  # no growth in these events
                print(f"device {device}, events {start}-{end}: the large pool's reserved memory last grew to "
                      f"{grown['reserved'] / 2**30:.2f} GiB from {grown['allocated'] / 2**30:.2f} GiB allocated there, "
                      "for "
                      + f"{request['size'] / 2**20:.1f} MiB: {where(request.get('frames', []))}")
                for hole in grown["holes"][:args.top]:
                    freed = hole["largest_freed"]
                    print(f"  hole {hole['size'] / 2**20:9.1f} MiB; largest freed there "
                          + (f"{freed['size'] / 2**20:.1f} MiB: {where(freed.get('frames', []))}" if freed else "none"))
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
