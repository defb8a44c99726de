"""Long-tailed Alpaca data for validating `rigplan run` against its plan (issue 14):

    python bench/validation_data.py --out data.jsonl [--examples 600] [--seed 0]

Word counts are lognormal (median MEDIAN_WORDS, sigma SIGMA), kept within MIN_WORDS-MAX_WORDS; each word is one
token of the code-made tokenizer (calibration/replica.py), so an example of n words is about n tokens plus the
chat template's. The instruction takes a fifth of the words, the answer the rest. Seeded: the same file every time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

MIN_WORDS, MAX_WORDS = 60, 1500
MEDIAN_WORDS, SIGMA = 420, 0.7


def word_counts(examples: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    while len(out) < examples:
        n = round(math.exp(rng.gauss(math.log(MEDIAN_WORDS), SIGMA)))
        if MIN_WORDS <= n <= MAX_WORDS:
            out.append(n)
    return out


def write(path: Path, examples: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed + 1)
    counts = word_counts(examples, seed)
    with Path(path).open("w") as f:
        for n in counts:
            words = [f"w{rng.randrange(1000, 4000)}" for _ in range(n)]
            cut = max(1, n // 5)
            f.write(json.dumps({"instruction": " ".join(words[:cut]), "input": "", "output": " ".join(words[cut:])}) + "\n")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    counts = write(a.out, a.examples, a.seed)
    s = sorted(counts)
    print(json.dumps({"examples": len(s), "min": s[0], "median": s[len(s) // 2], "max": s[-1], "seed": a.seed}))


if __name__ == "__main__":
    main()
