"""Data files: format detection and line-numbered problems, gathered before anything stops."""

from __future__ import annotations

import json

import pytest

from rigplan.errors import DataError
from rigplan import data


def write(tmp_path, lines: list[str]):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.parametrize("record,fmt", [
    ({"text": "hello"}, "text"),
    ({"instruction": "do", "input": "", "output": "done"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"),
])
def test_formats_are_detected(tmp_path, record, fmt) -> None:
    got, good, issues = data.validate(write(tmp_path, [json.dumps(record)] * 3))
    assert got == fmt and len(good) == 3 and not issues


def test_every_bad_line_is_reported_with_its_number(tmp_path) -> None:
    ok = json.dumps({"instruction": "a", "output": "b"})
    f = write(tmp_path, [ok, "{not json", json.dumps({"instruction": "a"}), ok, json.dumps({"instruction": "a", "output": " "})])
    _, good, issues = data.validate(f)
    assert [(i.line, i.reason) for i in issues] == [
        (2, "invalid JSON (Expecting property name enclosed in double quotes)"),
        (3, 'missing field "output"'), (5, 'empty "output"')]
    assert len(good) == 2
    with pytest.raises(DataError, match=r"3 bad record\(s\): line 2: invalid JSON .*--skip-bad"):
        data.estimated_lengths(f)
    assert len(data.estimated_lengths(f, skip_bad=True)) == 2


def test_unknown_role(tmp_path) -> None:
    f = write(tmp_path, [json.dumps({"messages": [{"role": "wizard", "content": "x"}]})])
    assert "unknown role 'wizard'" in data.validate(f)[2][0].reason


def test_json_array_and_percentile(tmp_path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "x" * (4 * n)} for n in range(1, 101)]))
    lengths = data.estimated_lengths(f)
    assert len(lengths) == 100 and lengths == sorted(lengths)  # a JSON array, read in order
    assert data.percentile(list(range(1, 101)), 95) == 95 and data.percentile(list(range(1, 101)), 50) == 50
    assert data.percentile(lengths, 95) == lengths[94] and data.percentile(lengths, 50) == lengths[49]
