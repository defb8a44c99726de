"""Token counts with the model's own tokenizer without torch (rigplan/tokens.py): the same counts as training's
(transformers' tokenizer, template and EOS included), found in a local directory or the hub cache."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rigplan import data, planning, tokens

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")


# Llama's replica: transformers loads its tokenizer.json as it is. (For a Qwen2 replica transformers 5 rebuilds
# Qwen2's byte-level tokenizer around the code-made vocabulary, which no real checkpoint does.)
@pytest.fixture(scope="module", params=["llama-3.2-1b"])
def replica(request, tmp_path_factory) -> Path:
    from rigplan.calibration.replica import build_replica, toy
    from rigplan.profiles.catalog import resolve_model

    d = tmp_path_factory.mktemp(request.param)
    build_replica(toy(resolve_model(request.param)), d, dtype="float32")
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    rng = random.Random(4)
    d = tmp_path_factory.mktemp("data")

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(200)}" for _ in range(n))

    alpaca, chat = d / "alpaca.jsonl", d / "chat.jsonl"
    alpaca.write_text("\n".join(json.dumps({"instruction": words(rng.randint(2, 40)), "input": words(3) if i % 3 else "",
                                            "output": words(rng.randint(2, 60))}) for i in range(40)) + "\n")
    chat.write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": words(5)}, {"role": "user", "content": words(rng.randint(1, 20))},
        {"role": "assistant", "content": words(rng.randint(1, 30))}, {"role": "user", "content": words(4)},
        {"role": "assistant", "content": words(7)}]}) for _ in range(30)) + "\n")
    return [alpaca, chat]


def test_counts_equal_trainings(replica, files) -> None:
    from transformers import AutoTokenizer

    for f in files:
        assert tokens.counted_lengths(str(replica), f) == data.token_lengths(f, AutoTokenizer.from_pretrained(replica))


def test_found_in_the_hub_cache_for_a_profile_and_used_by_check(replica, files, tmp_path, monkeypatch) -> None:
    from rigplan.profiles.catalog import resolve_model

    hub_id = resolve_model("llama-3.2-1b").hub_id
    snap = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (replica / name).exists():
            shutil.copy(replica / name, snap / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert tokens.tokenizer_dir(hub_id) == snap and tokens.tokenizer_dir("org/absent") is None
    d = planning.check("llama-3.2-1b", "rtx-4090", data_file=files[0])
    assert "tokenized with the model's tokenizer" in d["workload"]["source"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert "estimated from characters" in planning.check("llama-3.2-1b", "rtx-4090", data_file=files[0])[
        "workload"]["source"]


def test_counting_loads_no_torch(replica, files) -> None:
    code = (f"import sys; from rigplan import planning; planning.check({str(replica)!r}, 'rtx-4090', "
            f"data_file={str(files[1])!r}); print([m for m in sys.modules if m == 'torch' or m.startswith('transformers')])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
