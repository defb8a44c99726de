"""Token estimates without a tokenizer: characters counted by script, at the characters per token measured per
tokenizer family (profiles/token_rates.json, bench/token_rates.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rigplan import data
from rigplan.profiles import catalog

RATES = json.loads((Path(catalog.PROFILES_DIR) / "token_rates.json").read_text())
FAMILIES = RATES["families"]
MEASURED = [f for f in FAMILIES if f != "default"]
# Chinese Alpaca-style records (instruction, input, output), as alpaca_data_zh files hold them.
ZH_RECORDS = [
    {"instruction": "保持健康的三个提示。", "input": "",
     "output": "以下是保持健康的三个提示：\n\n1. 保持身体活动。每天做适当的身体运动，如散步、跑步或游泳，能促进心血管健康，"
               "增强肌肉力量，并有助于减少体重。\n\n2. 均衡饮食。每天食用新鲜的蔬菜、水果、全谷物和脂肪含量低的蛋白质食物，"
               "避免高糖、高脂肪和加工食品，以保持健康的饮食习惯。\n\n3. 睡眠充足。睡眠对人体健康至关重要，成年人每天应保证 "
               "7-8 小时的睡眠。良好的睡眠有助于减轻压力，促进身体恢复，并提高注意力和记忆力。"},
    {"instruction": "三原色是什么？", "input": "",
     "output": "三原色通常指的是红色、绿色和蓝色（RGB）。它们是通过加色混合原理创建色彩的三种基础颜色。在以发光为基础的显示设备中"
               "（如电视、计算机显示器、智能手机和平板电脑显示屏），三原色可混合产生大量色彩。"},
    {"instruction": "描述原子的结构。", "input": "",
     "output": "原子是物质的基本单位，它由三种基本粒子组成：质子、中子和电子。质子和中子形成原子核，位于原子中心，"
               "核外的电子围绕着原子核运动。"},
    {"instruction": "将以下句子翻译成英文。", "input": "我们如何减少空气污染？",
     "output": "How can we reduce air pollution?"},
    {"instruction": "给出一个形容词，找出它的反义词。", "input": "勇敢", "output": "胆小"},
]


def by_json(text: str, family: str) -> float:
    """The estimate worked out from the JSON alone: each class's characters / its rate (the default row's
    rate where the family's row has none; null costs nothing)."""
    row, default = FAMILIES[family]["chars_per_token"], FAMILIES["default"]["chars_per_token"]
    total = 0.0
    for script, n in data.script_counts(text).items():
        rate = row[script] if script in row else default[script]
        total += n / rate if rate else 0.0
    return total


def write(tmp_path: Path, records: list[dict]) -> Path:
    f = tmp_path / "zh.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return f


def test_script_classes() -> None:
    text = "Hi é Жж Ωω مر שלום नम ไท 汉字 かナ 한 7 \n!、￥“🦙ব"
    assert data.script_counts(text) == {
        "latin": 2, "latin_ext": 1, "cyrillic": 2, "greek": 2, "arabic": 2, "hebrew": 4, "devanagari": 2,
        "thai": 2, "han": 2, "kana": 2, "hangul": 1, "digit": 1, "space": 12, "newline": 1, "punct": 1,
        "cjk_punct": 2, "symbol": 1, "other": 2}
    assert sum(data.script_counts(text).values()) == len(text)
    assert set(data.script_counts("".join(map(chr, range(0x2FFFF)))).keys()) <= set(data.SCRIPTS)


@pytest.mark.parametrize("family", MEASURED + ["default"])
def test_chinese_is_far_from_four_characters_per_token(family) -> None:
    text = data.record_text(ZH_RECORDS[0], "alpaca")
    counts = data.script_counts(text)
    assert counts["han"] > 0.7 * len(text)
    estimate = data.estimate_tokens(text, family)
    assert estimate == pytest.approx(by_json(text, family), rel=1e-9)
    # Han text: the record's characters per token stay within 25% of the measured Han rate, and more than twice
    # the tokens the flat 4 characters per token gave.
    han_rate = FAMILIES[family]["chars_per_token"]["han"]
    assert han_rate < 2.0
    assert len(text) / estimate == pytest.approx(han_rate, rel=0.25)
    assert estimate > 2 * len(text) / data.CHARS_PER_TOKEN
    # and pure Han is exactly the rate
    assert data.estimate_tokens("汉" * 1000, family) == pytest.approx(1000 / han_rate)


@pytest.mark.parametrize("family", MEASURED)
def test_measured_chinese_alpaca_held_out(family) -> None:
    """The held-out Chinese Alpaca records: the estimate within 10% of the tokenizer's total, the flat 4.0 more
    than 50% short."""
    zh = RATES["validation"][family]["texts"]["zh:alpaca_zh_demo.json"]
    assert zh["records"] >= 100 and zh["tokens"] > 10_000
    assert abs(zh["total_error"]) < 0.10 and zh["flat_4_total_error"] < -0.50
    assert zh["median_example_error"] < zh["flat_4_median_example_error"]


def test_mixed_scripts_add_up() -> None:
    parts = ["The capital of France is Paris.", "法国的首都是巴黎。", "Столица Франции — Париж.",
             "フランスの首都はパリです。", "프랑스의 수도는 파리입니다.", "عاصمة فرنسا هي باريس.", "1789"]
    for family in FAMILIES:
        whole = data.estimate_tokens("".join(parts), family)
        assert whole == pytest.approx(sum(data.estimate_tokens(p, family) for p in parts))
        assert whole == pytest.approx(by_json("".join(parts), family))
    counts = data.script_counts("".join(parts))
    assert sum(counts.values()) == len("".join(parts))
    assert {"latin", "han", "cyrillic", "kana", "hangul", "arabic", "digit", "cjk_punct"} <= set(counts)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_row_has_its_provenance(family) -> None:
    row = FAMILIES[family]
    assert set(row["chars_per_token"]) <= set(data.SCRIPTS)
    assert {"latin", "han", "kana", "hangul", "cyrillic", "arabic", "devanagari"} <= set(row["chars_per_token"])
    assert all(r is None or 0.1 < r < 10 for r in row["chars_per_token"].values())
    sources = row["tokenizer"] if family == "default" else [row["tokenizer"]]
    assert sources and {s.get("family") for s in sources} >= ({None} if family != "default" else set(MEASURED))
    for s in sources:
        assert s["repo"].count("/") == 1 and s["path"] and re.fullmatch(r"[0-9a-f]{40}", s["commit"])
        assert re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) and s["vocab_size"] > 30_000
        for check in s.get("reference_checks", []):
            assert check["matched"] == check["cases"] > 0 and re.fullmatch(r"[0-9a-f]{40}", check["commit"])
    assert len(row["texts"]) >= 10
    for t in row["texts"]:
        assert t["repo"].count("/") == 1 and t["path"] and re.fullmatch(r"[0-9a-f]{40}", t["commit"])
        assert t["records"] > t["held_out_records"] > 0
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"])
    assert row["records"] > 1000
    assert row["command"].startswith("python3 bench/token_rates.py ")


def test_estimated_lengths_follow_the_json(tmp_path) -> None:
    f = write(tmp_path, ZH_RECORDS)
    for family in FAMILIES:
        want = [max(1, round(by_json(data.record_text(r, "alpaca"), family))) for r in ZH_RECORDS]
        assert data.estimated_lengths(f, family=family) == want
    flat = [max(1, round(len(data.record_text(r, "alpaca")) / data.CHARS_PER_TOKEN)) for r in ZH_RECORDS]
    got = data.estimated_lengths(f, family="qwen2")
    assert sum(got) > 2 * sum(flat)


def test_unknown_family_is_the_default_row(tmp_path) -> None:
    f = write(tmp_path, ZH_RECORDS)
    default = data.estimated_lengths(f, family="default")
    assert data.estimated_lengths(f, family="no-such-tokenizer") == default
    assert data.estimated_lengths(f) == default
    assert data.estimated_lengths(f, family=None) == default
    assert data.estimated_lengths(f, family="llama2_spm") != default


def test_old_call_signature_and_cache(tmp_path) -> None:
    f = write(tmp_path, ZH_RECORDS + [{"instruction": "x"}])
    with pytest.raises(Exception, match="bad record"):
        data.estimated_lengths(f)
    assert len(data.estimated_lengths(f, True)) == len(ZH_RECORDS)
    hits = data._estimated_lengths.cache_info().hits
    assert len(data.estimated_lengths(f, skip_bad=True)) == len(ZH_RECORDS)
    assert data._estimated_lengths.cache_info().hits == hits + 1
    assert data.MAX_RECORD_CHARS == 4 * 131_072 * 4  # its meaning is unchanged


@pytest.mark.parametrize("model,family", [
    ("llama-3.1-8b", "llama3"), ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama3"), ("llama-3.2-1b", "llama3"),
    ("qwen2.5-7b", "qwen2"), ("Qwen/Qwen3-8B", "qwen2"), ("qwen2.5-coder-7b", "qwen2"),
    ("mistral-7b", "mistral"), ("mixtral-8x7b", "mistral"), ("phi-3.5-mini", "llama2_spm"),
    ("gemma-2-9b", "default"), ("phi-4", "default"), ("mistral-nemo-12b", "default"),
])
def test_token_family(model, family) -> None:
    assert data.token_family(model) == family


def test_every_family_names_a_catalogue_model() -> None:
    ids = [m.id for m in catalog.models()]
    for family in MEASURED:
        assert any(data.token_family(i) == family for i in ids), family
