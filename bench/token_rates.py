"""Characters per token by script, measured with real tokenizers on real text: writes profiles/token_rates.json,
which `rigplan.data.estimated_lengths` reads when the model's tokenizer is not on the machine.

    python bench/token_rates.py \\
        --tokenizer FAMILY KIND FILE REPO REPO_PATH COMMIT  (once per tokenizer family) \\
        --text LANG FORMAT FILE REPO REPO_PATH COMMIT        (once per text file) \\
        [--check FAMILY INP OUT  --check-source FAMILY REPO REPO_PATH COMMIT] \\
        [--same-vocab FAMILY GGUF REPO REPO_PATH COMMIT] \\
        [--same-counts FAMILY KIND FILE REPO REPO_PATH COMMIT] \\
        [--applies-to FAMILY GLOB ...]  [--out profiles/token_rates.json]

Inputs are files fetched from public repositories into a scratch folder (never the repo); REPO, REPO_PATH and
COMMIT say where each came from and go into the JSON with the file's sha256. --check compares a tokenizer
with llama.cpp's tokenizer tests (strings and the ids the model's own tokenizer gave them), --same-vocab with
another model's vocabulary, --same-counts counts every record with a second tokenizer and says whether each
count is the same (then the family's row stands for both).

KIND: `tiktoken` (a base64 `token rank` file, Llama 3's split pattern), `bpe` (`VOCAB_JSON,MERGES_TXT`, Qwen2's
split pattern and NFC), `spm` (a SentencePiece BPE .model, read without sentencepiece or protobuf and run as
transformers' converter builds it: the pieces as vocabulary, merges ordered by piece score, byte fallback, the
dummy prefix), or `json` (a tokenizer.json). FORMAT: `alpaca` (a JSON array of instruction/input/output),
`squad` (XQuAD: each paragraph a record of context + first question + answer, each further question a short
record of question + answer), `conllu` (Universal Dependencies: the `# text` sentences in runs of 1 to 8 a
record), `jsonl-prompt` (one {"prompt"} a line).

Each record's text is what rigplan.data.record_text gives (alpaca: instruction, input, output joined by "\\n"),
counted without special tokens. A fifth of each file's units (a paragraph with its questions, a run of
sentences, an example), picked by a hash of the unit, is held out: the rates are fitted on the rest and the
"validation" block reports the held-out errors, new estimate against the flat 4 characters per token.

The fit: tokens = sum over script classes of characters x tokens-per-character, a non-negative least squares
over the fitted records of every language, each record weighted 1 / (its tokens x its language's records), so
each language weighs the same and every record's error counts relative to its size. The "default" row is the
same fit over the records of every family together. A class no fitted text has (a script absent from every
language) is left out of a row, and the estimate then takes the default row's rate for it.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import shlex
import statistics
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import nnls

from rigplan.data import SCRIPTS, CHARS_PER_TOKEN, script_counts

OUT = Path(__file__).resolve().parent.parent / "profiles" / "token_rates.json"
HELD_OUT = 5  # one unit in HELD_OUT is held out
# Split patterns, as the tokenizers' own code gives them: Llama 3's in meta-llama/llama-models
# models/llama3/tokenizer.py (pat_str), Qwen2's in transformers models/qwen2/tokenization_qwen2.py
# (PRETOKENIZE_REGEX, with an NFC normalizer).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------------------------------------- tokenizers

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str, nfc: bool,
                ignore_merges: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tiktoken(path: Path):
    """A tiktoken rank file as a byte-level BPE (as transformers' TikTokenConverter converts it: every split of a
    token into two tokens is a merge, ordered by the token's rank; whole pieces in the vocabulary are kept)."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges += [(rank, m) for m in local]
    merges.sort(key=lambda m: m[0])
    return _byte_level({s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for _, (a, b) in merges],
                       LLAMA3_PATTERN, nfc=False, ignore_merges=True)


def load_bpe(paths: str):
    vocab_file, merges_file = paths.split(",")
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return _byte_level(vocab, merges, QWEN2_PATTERN, nfc=True, ignore_merges=False)


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message, enough for sentencepiece_model.proto."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not handled")
        yield field, wire, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def read_spm(path: Path) -> dict[str, Any]:
    """A SentencePiece ModelProto: pieces (piece, score, type), model type, byte fallback, normalizer flags."""
    pieces, trainer, normalizer = [], {}, {"add_dummy_prefix": 1, "remove_extra_whitespaces": 1, "name": ""}
    for field, _, value in _proto_fields(path.read_bytes()):
        if field == 1:
            piece = {"piece": "", "score": 0.0, "type": 1}
            for f, _, v in _proto_fields(value):
                if f == 1:
                    piece["piece"] = v.decode("utf-8")
                elif f == 2:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif f == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif field == 2:
            trainer = {f: v for f, _, v in _proto_fields(value)}
        elif field == 3:
            for f, _, v in _proto_fields(value):
                if f == 1:
                    normalizer["name"] = v.decode()
                elif f == 3:
                    normalizer["add_dummy_prefix"] = v
                elif f == 4:
                    normalizer["remove_extra_whitespaces"] = v
    return {"pieces": pieces, "model_type": trainer.get(3, 1), "byte_fallback": bool(trainer.get(35, 0)),
            "normalizer": normalizer}


def load_spm(path: Path):
    """A SentencePiece BPE model as the tokenizers library runs it (transformers' Llama converter, legacy: "▁"
    prepended, spaces as "▁", one word, byte fallback); merges: every split of a normal piece into two pieces,
    the piece with the higher score merging first, as SentencePiece's BPE merges."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers

    m = read_spm(path)
    if m["model_type"] != 2:
        raise SystemExit(f"{path}: SentencePiece model type {m['model_type']} (only BPE, 2, is handled)")
    norm = m["normalizer"]
    if norm["name"] not in ("identity", "") or norm["remove_extra_whitespaces"]:
        raise SystemExit(f"{path}: normalizer {norm} (only identity without whitespace folding is handled)")
    vocab = {p["piece"]: i for i, p in enumerate(m["pieces"])}
    score = {p["piece"]: p["score"] for p in m["pieces"] if p["type"] == 1}
    merges = []
    for piece, sc in score.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in score and piece[i:] in score]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges += [(-sc, vocab[piece], pair) for pair in local]
    merges.sort(key=lambda x: (x[0], x[1]))
    unk = next((p["piece"] for p in m["pieces"] if p["type"] == 2), None)
    tok = Tokenizer(models.BPE(vocab, [pair for _, _, pair in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=m["byte_fallback"]))
    steps = ([normalizers.Prepend("▁")] if norm["add_dummy_prefix"] else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.add_special_tokens([AddedToken(p["piece"], normalized=False, special=True)
                            for p in m["pieces"] if p["type"] == 3])
    tok.add_tokens([AddedToken(p["piece"], normalized=False) for p in m["pieces"] if p["type"] == 4])
    return tok


def load_tokenizer(kind: str, file: str):
    from tokenizers import Tokenizer

    loaders: dict[str, Callable[[], Any]] = {
        "tiktoken": lambda: load_tiktoken(Path(file)), "bpe": lambda: load_bpe(file),
        "spm": lambda: load_spm(Path(file)), "json": lambda: Tokenizer.from_file(file)}
    if kind not in loaders:
        raise SystemExit(f"unknown tokenizer kind {kind!r} (use one of {', '.join(loaders)})")
    return loaders[kind]()


def gguf_tokens(path: Path) -> list[str]:
    """tokenizer.ggml.tokens of a GGUF file (llama.cpp's vocabulary-only test models)."""
    buf = path.read_bytes()
    if buf[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    _, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
    i = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(i: int) -> tuple[str, int]:
        n = struct.unpack_from("<Q", buf, i)[0]
        return buf[i + 8:i + 8 + n].decode("utf-8", "replace"), i + 8 + n

    def value(kind: int, i: int) -> tuple[Any, int]:
        if kind == 8:
            return string(i)
        if kind == 9:
            inner, n = struct.unpack_from("<IQ", buf, i)
            i += 12
            out = []
            for _ in range(n):
                v, i = value(inner, i)
                out.append(v)
            return out, i
        return None, i + sizes[kind]

    for _ in range(n_kv):
        key, i = string(i)
        kind = struct.unpack_from("<I", buf, i)[0]
        v, i = value(kind, i + 4)
        if key == "tokenizer.ggml.tokens":
            return v
    raise SystemExit(f"{path}: no tokenizer.ggml.tokens")


def reference_check(tok, inp: Path, out: Path) -> dict[str, Any]:
    """How many of llama.cpp's tokenizer test strings (ggml-vocab-*.gguf.inp/.out, made with the model's own
    transformers tokenizer) this tokenizer encodes to the same ids."""
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wanted = out.read_text(encoding="utf-8").split("\n")
    cases = [(t, [int(x) for x in w.split()]) for t, w in zip(texts, wanted)]
    matched = sum(tok.encode(t, add_special_tokens=False).ids == w for t, w in cases)
    return {"cases": len(cases), "matched": matched}


# ---------------------------------------------------------------------------------------------------- texts

def alpaca_text(r: dict[str, Any]) -> str:
    return "\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output"))  # as data.record_text


def units(fmt: str, path: Path) -> list[list[str]]:
    """The file's records, grouped in units that are held out together."""
    if fmt == "alpaca":
        return [[alpaca_text(r)] for r in json.loads(path.read_text(encoding="utf-8"))]
    if fmt == "squad":
        out = []
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                qas = para["qas"]
                first = alpaca_text({"instruction": qas[0]["question"], "input": para["context"],
                                     "output": qas[0]["answers"][0]["text"]})
                out.append([first] + [alpaca_text({"instruction": q["question"], "output": q["answers"][0]["text"]})
                                      for q in qas[1:]])
        return out
    if fmt == "conllu":
        sentences = [line[len("# text = "):] for line in path.read_text(encoding="utf-8").splitlines()
                     if line.startswith("# text = ")]
        out, i, k = [], 0, 0
        while i < len(sentences):
            n = 1 + k % 8
            out.append([" ".join(sentences[i:i + n]) if fmt_is_spaced(sentences[i]) else "".join(sentences[i:i + n])])
            i, k = i + n, k + 1
        return out
    if fmt == "jsonl-prompt":
        return [[json.loads(line)["prompt"]] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise SystemExit(f"unknown text format {fmt!r}")


def fmt_is_spaced(sentence: str) -> bool:
    """Whether sentences of this language are joined with a space (not Chinese or Japanese)."""
    counts = script_counts(sentence)
    return counts.get("han", 0) + counts.get("kana", 0) < len(sentence) / 4


def held_out(lang: str, fmt: str, index: int) -> bool:
    return zlib.crc32(f"{lang}:{fmt}:{index}".encode()) % HELD_OUT == 0


# ------------------------------------------------------------------------------------------------------ fit

def features(text: str) -> list[int]:
    counts = script_counts(text)
    return [counts.get(s, 0) for s in SCRIPTS]


def fit(rows: list[tuple[str, list[int], int]]) -> dict[str, float | None]:
    """Non-negative tokens per character of each class that the rows have, weighted as the docstring says;
    returned as characters per token (None: the class costs no token of its own)."""
    per_lang: dict[str, int] = {}
    for lang, _, _ in rows:
        per_lang[lang] = per_lang.get(lang, 0) + 1
    x = np.array([f for _, f, _ in rows], dtype=float)
    y = np.array([t for _, _, t in rows], dtype=float)
    w = np.sqrt(1.0 / (np.maximum(y, 1) * np.array([per_lang[lang] for lang, _, _ in rows])))
    present = [j for j in range(len(SCRIPTS)) if x[:, j].sum() > 0]
    coef, _ = nnls(x[:, present] * w[:, None], y * w, maxiter=10_000)
    return {SCRIPTS[j]: (round(1.0 / c, 4) if c > 1e-6 else None) for j, c in zip(present, coef)}


def estimate(f: list[int], rates: dict[str, float | None], default: dict[str, float | None]) -> float:
    total = 0.0
    for s, n in zip(SCRIPTS, f):
        if n:
            r = rates[s] if s in rates else default.get(s, CHARS_PER_TOKEN)
            total += n / r if r else 0.0
    return total


def errors(cases: list[tuple[list[int], int, int]], rates, default) -> dict[str, Any]:
    """Held-out errors of one family on one language: cases are (features, chars, true tokens)."""
    true = sum(t for _, _, t in cases)
    new = [max(1, round(estimate(f, rates, default))) for f, _, _ in cases]
    old = [max(1, round(c / CHARS_PER_TOKEN)) for _, c, _ in cases]
    return {
        "records": len(cases), "tokens": true, "estimated_tokens": sum(new), "flat_4_tokens": sum(old),
        "total_error": round(sum(new) / true - 1, 4), "flat_4_total_error": round(sum(old) / true - 1, 4),
        "median_example_error": round(statistics.median(abs(e / t - 1) for e, (_, _, t) in zip(new, cases)), 4),
        "flat_4_median_example_error": round(statistics.median(abs(e / t - 1) for e, (_, _, t) in zip(old, cases)), 4),
    }


def summary(per_lang: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean over texts of the absolute total error, and of the median per-example error."""
    def mean(key: str) -> float:
        return round(statistics.mean(abs(v[key]) for v in per_lang.values()), 4)
    return {"mean_abs_total_error": mean("total_error"), "flat_4_mean_abs_total_error": mean("flat_4_total_error"),
            "mean_median_example_error": mean("median_example_error"),
            "flat_4_mean_median_example_error": mean("flat_4_median_example_error")}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    for part in path.split(","):
        h.update(Path(part).read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", nargs=6, action="append", required=True,
                    metavar=("FAMILY", "KIND", "FILE", "REPO", "REPO_PATH", "COMMIT"))
    ap.add_argument("--text", nargs=6, action="append", required=True,
                    metavar=("LANG", "FORMAT", "FILE", "REPO", "REPO_PATH", "COMMIT"))
    ap.add_argument("--check", nargs=3, action="append", default=[], metavar=("FAMILY", "INP", "OUT"),
                    help="llama.cpp's test strings and the ids the model's tokenizer gives them")
    ap.add_argument("--check-source", nargs=4, action="append", default=[],
                    metavar=("FAMILY", "REPO", "REPO_PATH", "COMMIT"))
    ap.add_argument("--same-vocab", nargs=5, action="append", default=[],
                    metavar=("FAMILY", "GGUF", "REPO", "REPO_PATH", "COMMIT"),
                    help="another model's vocabulary (GGUF) that should equal this tokenizer's")
    ap.add_argument("--same-counts", nargs=6, action="append", default=[],
                    metavar=("FAMILY", "KIND", "FILE", "REPO", "REPO_PATH", "COMMIT"),
                    help="another tokenizer that the family's row should stand for")
    ap.add_argument("--applies-to", nargs="+", action="append", default=[], metavar=("FAMILY", "GLOB"))
    ap.add_argument("--note", nargs=2, action="append", default=[], metavar=("FAMILY", "TEXT"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "python3 bench/token_rates.py " + " ".join(shlex.quote(a) for a in given)
    today = datetime.date.today().isoformat()

    texts = []
    for lang, fmt, file, repo, repo_path, commit in args.text:
        groups = units(fmt, Path(file))
        recs = [(held_out(lang, fmt, i), t) for i, g in enumerate(groups) for t in g if t.strip()]
        texts.append({"label": f"{lang}:{Path(repo_path).name}", "language": lang, "format": fmt, "repo": repo,
                      "path": repo_path, "commit": commit, "sha256": sha256(file), "records": len(recs),
                      "held_out_records": sum(h for h, _ in recs), "_recs": recs})
        print(f"text {lang} {repo}/{repo_path}: {len(recs)} records", file=sys.stderr)

    families: dict[str, Any] = {}
    measured: dict[str, list[tuple[str, bool, list[int], int, int]]] = {}
    for family, kind, file, repo, repo_path, commit in args.tokenizer:
        tok = load_tokenizer(kind, file)
        source = {"repo": repo, "path": repo_path, "commit": commit, "sha256": sha256(file), "kind": kind,
                  "vocab_size": tok.get_vocab_size()}
        sources = [c[1:] for c in args.check_source if c[0] == family]
        for n, (inp, out) in enumerate(c[1:] for c in args.check if c[0] == family):
            check = dict(zip(("repo", "path", "commit"), sources[n])) if n < len(sources) else {}
            source.setdefault("reference_checks", []).append({**check, **reference_check(tok, Path(inp), Path(out))})
        for fam, gguf, grepo, gpath, gcommit in args.same_vocab:
            if fam == family:
                theirs = gguf_tokens(Path(gguf))
                ours = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
                shared = min(len(ours), len(theirs))
                source.setdefault("same_vocab", []).append({
                    "repo": grepo, "path": gpath, "commit": gcommit, "sha256": sha256(gguf), "size": len(theirs),
                    "identical_first_tokens": next((i for i in range(shared) if ours[i] != theirs[i]), shared)})
        rows = []
        for t in texts:
            for hold, text in t["_recs"]:
                rows.append((t["label"], hold, features(text), len(text),
                             len(tok.encode(text, add_special_tokens=False).ids)))
        measured[family] = rows
        for fam, kind2, file2, repo2, path2, commit2 in args.same_counts:
            if fam == family:
                other = load_tokenizer(kind2, file2)
                every = [text for t in texts for _, text in t["_recs"]]  # the order rows were counted in
                same = sum(len(other.encode(text, add_special_tokens=False).ids) == r[4]
                           for text, r in zip(every, rows))
                source.setdefault("same_counts", []).append({
                    "repo": repo2, "path": path2, "commit": commit2, "sha256": sha256(file2), "kind": kind2,
                    "vocab_size": other.get_vocab_size(), "records": len(rows), "identical_counts": same})
        families[family] = {"tokenizer": source}
        print(f"tokenizer {family}: {source}", file=sys.stderr)

    provenance = [{k: v for k, v in t.items() if k != "_recs"} for t in texts]
    lang_of = {t["label"]: t["language"] for t in texts}
    fitted = {fam: fit([(lang_of[label], f, n) for label, hold, f, _, n in rows if not hold])
              for fam, rows in measured.items()}
    # The default row: every family's fitted records together (a language weighs the same in each family).
    default = fit([(f"{fam}:{lang_of[label]}", f, n) for fam, rows in measured.items()
                   for label, hold, f, _, n in rows if not hold])
    applies = {a[0]: a[1:] for a in args.applies_to}
    notes = {fam: text for fam, text in args.note}
    out_families: dict[str, Any] = {}
    for fam in list(measured) + ["default"]:
        rows = [r for rs in measured.values() for r in rs] if fam == "default" else measured[fam]
        row: dict[str, Any] = {"chars_per_token": default if fam == "default" else fitted[fam]}
        if fam in applies:
            row["applies_to"] = applies[fam]
        row["tokenizer"] = (families[fam]["tokenizer"] if fam != "default" else
                            [dict(families[f]["tokenizer"], family=f) for f in measured])
        if fam in notes:
            row["note"] = notes[fam]
        row.update({"texts": provenance, "records": sum(not r[1] for r in rows), "date": today, "command": command})
        out_families[fam] = row

    validation: dict[str, Any] = {}
    for fam, rows in measured.items():
        for name, rates in ((fam, fitted[fam]), (f"default@{fam}", default)):
            per_lang = {}
            for label in lang_of:
                cases = [(f, c, n) for lb, hold, f, c, n in rows if hold and lb == label]
                if cases:
                    per_lang[label] = errors(cases, rates, default)
            validation[name] = {**summary(per_lang), "texts": per_lang}

    doc = {
        "about": ("Characters per token of each script class (rigplan.data.SCRIPTS), per tokenizer family, fitted "
                  "on real text with real tokenizers by bench/token_rates.py; rigplan.data.estimated_lengths "
                  "divides each record's characters of a class by its rate. null: the class costs no token of its "
                  "own (it merges into its neighbours'). A family's applies_to globs name the catalogue models "
                  "that use its tokenizer; any other model, or no family, takes the default row, which is fitted "
                  "on every family's records together."),
        "method": " ".join("\n\n".join(__doc__.strip().split("\n\n")[-2:]).split()),
        "families": out_families,
        "validation": {"about": ("Held-out records (a fifth of each text's units, not fitted): per text "
                                 "(LANGUAGE:FILE), true tokens (the tokenizer, no special tokens), the "
                                 "estimate's and the flat 4.0 characters per token's totals and errors (estimate "
                                 "/ true - 1), and the median per-example absolute error; default@FAMILY is the "
                                 "default row against that family's tokenizer. The means are over the texts, of "
                                 "the absolute errors."),
                       **validation},
    }
    args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
