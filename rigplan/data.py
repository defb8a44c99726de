"""Training data: format detection, line-numbered validation, length statistics.

Standard library only, so `rigplan check --data FILE` stays instant and torch-free. Formats: {"text"},
Alpaca {"instruction", "input", "output"}, chat {"messages": [{"role", "content"}]} and ShareGPT
{"conversations": [{"from", "value"}]}, in JSONL or one JSON array.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from rigplan.errors import DataError

Format = Literal["text", "alpaca", "chat", "sharegpt"]
# Without the model's tokenizer (check downloads nothing), lengths are estimated from characters, counted by
# script and divided by each script's characters per token as measured with real tokenizers on real text
# (profiles/token_rates.json, written by bench/token_rates.py); rigplan run counts with the model's tokenizer.
# CHARS_PER_TOKEN, the flat figure estimates once used, now only sizes MAX_RECORD_CHARS below.
CHARS_PER_TOKEN = 4.0
CHAT_ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}
MAX_SHOWN = 20
# A record longer than this many characters is refused before any tokenizer sees it: four times what the
# longest context rigplan plans for (131,072 tokens, Llama 3.1's) holds at CHARS_PER_TOKEN, so no model trains
# on more than a quarter of it (a 50 MB line took `rigplan run` 69 s to tokenize, then planned seq 131,072).
MAX_RECORD_CHARS = 4 * 131_072 * int(CHARS_PER_TOKEN)
# The chat template used when a tokenizer has none (ChatML, as Qwen's tokenizers use): stated in the data report.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class DataIssue:
    """One bad record: its 1-based line (JSONL) or index (JSON array), and what is wrong."""

    line: int
    reason: str


def detect_format(record: dict[str, Any]) -> Format | None:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _problem(record: Any, fmt: Format) -> str | None:
    """What is wrong with one record of the file's format, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if fmt == "text":
        text = record.get("text")
        return 'missing field "text"' if text is None else None if isinstance(text, str) and text.strip() \
            else 'empty "text"'
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in record:
                return f'missing field "{key}"'
            if not isinstance(record[key], str) or not record[key].strip():
                return f'empty "{key}"'
        return None
    key, role_key, text_key, roles = (("messages", "role", "content", CHAT_ROLES) if fmt == "chat"
                                      else ("conversations", "from", "value", set(SHAREGPT_ROLES)))
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        return f'missing or empty "{key}"'
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            return f'turn {n}: needs "{role_key}" and "{text_key}"'
        if turn[role_key] not in roles:
            return f'turn {n}: unknown role {turn[role_key]!r} (use one of {", ".join(sorted(roles))})'
        if not isinstance(turn[text_key], str):
            return f'turn {n}: "{text_key}" is not a string'
    # Chat and ShareGPT train on the assistant's turns only (tokenize): without one, nothing would train.
    if not any(SHAREGPT_ROLES.get(t[role_key], t[role_key]) == "assistant" for t in turns):
        return "no assistant turn, so nothing in it would train; add the reply as an assistant turn"
    return None


def require_file(path: Path) -> Path:
    """The data file, or a DataError saying it is missing (before anything stats or reads it)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"{path} {what}; pass --data with a JSONL or JSON file")
    return path


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(line, record) pairs; a line that is not JSON becomes (line, DataIssue)."""
    path = require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); pass a UTF-8 JSONL or JSON file") from e
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg}); fix the file") from e
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_CHARS:  # refused unparsed: no tokenizer or planner should see it
            out.append((n, DataIssue(n, _too_long(len(line)))))
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, DataIssue(n, f"invalid JSON ({e.msg})")))
    return out


def _too_long(chars: int) -> str:
    return (f"{chars:,} characters, more than the {MAX_RECORD_CHARS:,} a record may have (no model's context "
            "holds a quarter of it); split it")


def validate(path: Path) -> tuple[Format, list[tuple[int, dict[str, Any]]], list[DataIssue]]:
    """The file's format, its good records and every problem (all gathered before anything stops). The file's
    format is its most common one (a tie: the first record's); a record of another format is a problem, so
    that check and run read a mixed file the same way."""
    records = read_records(path)
    found = [(line, detect_format(r)) for line, r in records if isinstance(r, dict)]
    counts: dict[str, int] = {}  # formats in first-seen order, with how many records have each
    for _, f in found:
        if f:
            counts[f] = counts.get(f, 0) + 1
    if not counts:
        raise DataError(f"{path}: no record has text, instruction/output, messages or conversations; "
                        "use one of those formats")
    fmt = max(counts, key=counts.__getitem__)  # dicts keep first-seen order: ties go to the first format
    good, issues = [], []
    for line, rec in records:
        other = detect_format(rec) if isinstance(rec, dict) else None
        if isinstance(rec, DataIssue):
            reason = rec.reason
        elif other not in (None, fmt):
            reason = (f"a {other} record in a file of {counts[fmt]:,} {fmt} records; use one format per file")
        else:
            reason = _problem(rec, fmt)
            if reason is None and len(record_text(rec, fmt)) > MAX_RECORD_CHARS:  # one of a JSON array
                reason = _too_long(len(record_text(rec, fmt)))
        if reason:
            issues.append(DataIssue(line, reason))
        else:
            good.append((line, rec))
    return fmt, good, issues


def issues_message(path: Path, issues: list[DataIssue]) -> str:
    shown = "; ".join(f"line {i.line}: {i.reason}" for i in issues[:MAX_SHOWN])
    more = f" (and {len(issues) - MAX_SHOWN} more)" if len(issues) > MAX_SHOWN else ""
    return f"{path}: {len(issues)} bad record(s): {shown}{more}; fix them or pass --skip-bad"


def record_text(record: dict[str, Any], fmt: Format) -> str:
    """All the text a record carries, for length estimates."""
    if fmt == "text":
        return record["text"]
    if fmt == "alpaca":
        return "\n".join(str(record.get(k) or "") for k in ("instruction", "input", "output"))
    key, text_key = ("messages", "content") if fmt == "chat" else ("conversations", "value")
    return "\n".join(t[text_key] for t in record[key])


# Script classes the estimate counts characters in (profiles/token_rates.json gives each its characters per
# token, per tokenizer family). Ranges are Unicode blocks; what no range names goes by its Unicode category.
SCRIPTS = ("latin", "latin_ext", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "han", "kana",
           "hangul", "digit", "space", "newline", "punct", "cjk_punct", "symbol", "other")
_SCRIPT_RANGES = (  # (first, last, class); no two overlap
    (0x00C0, 0x024F, "latin_ext"), (0x0250, 0x02AF, "latin_ext"), (0x0300, 0x036F, "latin_ext"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x0870, 0x08FF, "arabic"),
    (0x0900, 0x097F, "devanagari"), (0x0E00, 0x0E7F, "thai"), (0x1100, 0x11FF, "hangul"),
    (0x1C80, 0x1C8F, "cyrillic"), (0x1E00, 0x1EFF, "latin_ext"), (0x1F00, 0x1FFF, "greek"),
    (0x2DE0, 0x2DFF, "cyrillic"), (0x2E80, 0x2FDF, "han"), (0x3000, 0x303F, "cjk_punct"),
    (0x3040, 0x30FF, "kana"), (0x3130, 0x318F, "hangul"), (0x31F0, 0x31FF, "kana"), (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"), (0xA640, 0xA69F, "cyrillic"), (0xA960, 0xA97F, "hangul"), (0xAC00, 0xD7FF, "hangul"),
    (0xF900, 0xFAFF, "han"), (0xFB1D, 0xFB4F, "hebrew"), (0xFB50, 0xFDFF, "arabic"), (0xFE30, 0xFE4F, "cjk_punct"),
    (0xFE70, 0xFEFF, "arabic"), (0xFF00, 0xFF65, "cjk_punct"), (0xFF66, 0xFF9F, "kana"), (0xFFA0, 0xFFDC, "hangul"),
    (0xFFE0, 0xFFEF, "cjk_punct"), (0x20000, 0x3FFFF, "han"),
)
_CODE = {name: chr(ord("a") + i) for i, name in enumerate(SCRIPTS)}  # one letter per class, for str.count


def _script_of(cp: int) -> str:
    """The script class of one code point."""
    if cp < 128:
        ch = chr(cp)
        return ("latin" if ch.isalpha() else "digit" if ch.isdigit() else "space" if ch == " " else
                "newline" if ch.isspace() or cp < 32 or cp == 127 else "punct")
    for first, last, name in _SCRIPT_RANGES:
        if first <= cp <= last:
            return "symbol" if name == "latin_ext" and cp in (0xD7, 0xF7) else name
    category = unicodedata.category(chr(cp))
    if category == "Nd":
        return "digit"
    if category == "Zs":
        return "space"
    if category[0] in "CZ":
        return "newline"
    if category[0] in "PS" and cp < 0x1F000:  # emoji and the planes above go to "other", as byte sequences
        return "symbol"
    return "other"


class _ScriptMap(dict):
    """Code point -> class letter for str.translate, filled as code points are first met."""

    def __missing__(self, cp: int) -> str:
        self[cp] = code = _CODE[_script_of(cp)]
        return code


_SCRIPT_MAP = _ScriptMap()
_ASCII_TABLE = bytes(ord(_CODE[_script_of(b)]) for b in range(128)) + b"r" * 128


def _coded(text: str) -> str:
    """text with each character replaced by its script class's letter (_CODE), for str.count."""
    return (text.encode("ascii").translate(_ASCII_TABLE).decode("ascii") if text.isascii()
            else text.translate(_SCRIPT_MAP))


def script_counts(text: str) -> dict[str, int]:
    """Characters of each script class in text (classes with none are left out)."""
    coded = _coded(text)
    counts = {name: coded.count(code) for name, code in _CODE.items()}
    return {name: n for name, n in counts.items() if n}


@lru_cache(maxsize=1)
def token_rates() -> dict[str, Any]:
    """profiles/token_rates.json: measured characters per token by script, per tokenizer family."""
    from rigplan import profiles

    return json.loads((Path(profiles.__file__).resolve().parent / "token_rates.json").read_text())


@lru_cache(maxsize=16)
def _tokens_per_char(family: str | None) -> tuple[float, ...]:
    """Tokens per character of each class in SCRIPTS for a family ("default" where it has no row); a class
    the row leaves out takes the default row's rate, and a rate of null means the class costs no token."""
    families = token_rates()["families"]
    default = families["default"]["chars_per_token"]
    row = families.get(family or "default", families["default"])["chars_per_token"]
    rates = [row[s] if s in row else default.get(s, CHARS_PER_TOKEN) for s in SCRIPTS]
    return tuple(0.0 if r is None else 1.0 / r for r in rates)


def token_family(model: str) -> str:
    """The token_rates.json family whose tokenizer a catalogue model id (or hub id) uses; "default" if none."""
    name = model.lower().rsplit("/", 1)[-1]
    for family, row in token_rates()["families"].items():
        if any(fnmatch(name, pattern) for pattern in row.get("applies_to", ())):
            return family
    return "default"


def estimate_tokens(text: str, family: str | None = None) -> float:
    """Tokens text is estimated to take in a family's tokenizer (no special tokens, no template)."""
    per_char, coded = _tokens_per_char(family), _coded(text)
    return sum(coded.count(code) * rate for code, rate in zip(_CODE.values(), per_char) if rate)


def estimated_lengths(path: Path, skip_bad: bool = False, family: str | None = None) -> list[int]:
    """Estimated tokens per example, for planning without a tokenizer: characters counted by script, each
    script at its measured characters per token for the tokenizer family (token_rates.json; an unknown or no
    family takes the "default" row). A file is read once per process while it is unchanged (`rigplan run`
    with overrides plans, then re-estimates)."""
    st = require_file(path).stat()
    return list(_estimated_lengths(Path(path), str(Path(path).resolve()), st.st_mtime_ns, st.st_size, skip_bad,
                                   family))


@lru_cache(maxsize=4)
def _estimated_lengths(path: Path, _where: str, _mtime_ns: int, _size: int, skip_bad: bool,
                       family: str | None = None) -> tuple[int, ...]:
    fmt, good, issues = validate(path)
    if issues and not skip_bad:
        raise DataError(issues_message(path, issues))
    return tuple(max(1, round(estimate_tokens(record_text(r, fmt), family))) for _, r in good)


def use_template(tokenizer: Any, fmt: Format) -> str:
    """Give a tokenizer without a chat template rigplan's default when the records need one; says which
    template the examples are rendered with (for the data report)."""
    if getattr(tokenizer, "chat_template", None) is None and fmt in ("chat", "alpaca", "sharegpt"):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return "ChatML (rigplan's default: the tokenizer has no chat template)"
    return "the tokenizer's own" if fmt != "text" else "none (text trains on everything)"


def token_lengths(path: Path, tokenizer: Any, sample: int = 2000, skip_bad: bool = False) -> tuple[list[int], int]:
    """Tokens per example counted with the model's tokenizer, as training will count them (template and EOS
    included), for at most `sample` records evenly spread over the file (enough for the length distribution
    a plan's speed depends on, in seconds), and how many examples the file holds. Bad records stop it, as
    estimated_lengths does."""
    fmt, good, issues = validate(path)
    if issues and not skip_bad:
        raise DataError(issues_message(path, issues))
    step = max(1, len(good) / sample)
    picked = [good[int(i * step)][1] for i in range(min(sample, len(good)))]
    use_template(tokenizer, fmt)
    return [len(tokenize(r, fmt, tokenizer)[0]) for r in picked], len(good)


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def to_messages(record: dict[str, Any], fmt: Format) -> list[dict[str, str]]:
    """Alpaca and ShareGPT records as chat messages (role, content)."""
    if fmt == "chat":
        return [{"role": t["role"], "content": t["content"]} for t in record["messages"]]
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def tokenize(record: dict[str, Any], fmt: Format, tokenizer: Any) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 where no loss): text trains on everything; chat and Alpaca on the
    assistant's turns only, through the tokenizer's chat template. EOS ends every example."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        ids = ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
        return ids, list(ids)
    messages = to_messages(record, fmt)
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        # Render the conversation up to this turn; the new text is this turn's (templates only append).
        # Before an assistant turn, its header (add_generation_prompt) goes with the prompt, untrained.
        steps = [(messages[:i], True, False)] if message["role"] == "assistant" else []
        steps.append((messages[: i + 1], False, message["role"] == "assistant"))
        for convo, gen_prompt, trained in steps:
            text = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen_prompt) if convo else ""
            piece = text[len(rendered):] if text.startswith(rendered) else text
            rendered = text
            piece_ids = tokenizer(piece, add_special_tokens=not ids)["input_ids"] if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [-100] * len(piece_ids)
    if eos is not None and ids[-1] != eos:
        ids.append(eos)
        labels.append(eos if messages[-1]["role"] == "assistant" else -100)
    return ids, labels
