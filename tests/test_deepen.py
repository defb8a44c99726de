"""bench/deepen.py, which makes the full-depth 70B replica for the sharded run from its 8-layer 4-bit copy (the
disk holds no 16-bit 70B to quantize): on a toy Llama, the deepened checkpoint loads in transformers with every
weight found, at the new depth, each layer a copy of the layer its index wraps to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from deepen import deepen  # noqa: E402


def test_a_deepened_checkpoint_loads_whole_at_its_new_depth(tmp_path, toy_llama_and_data) -> None:
    from transformers import AutoModelForCausalLM

    src, _ = toy_llama_and_data(tmp_path, 4)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    deepen(src, tmp_path / "deep", 2 * layers + 1)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "deep", output_loading_info=True)
    assert model.config.num_hidden_layers == 2 * layers + 1
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    base = AutoModelForCausalLM.from_pretrained(src)
    weight = lambda m, j: m.model.layers[j].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(weight(model, 2 * layers), weight(base, 0))
    assert torch.equal(weight(model, layers + 1), weight(base, 1)) and not torch.equal(weight(base, 0), weight(base, 1))
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert (tmp_path / "deep" / "tokenizer.json").exists() or (tmp_path / "deep" / "tokenizer_config.json").exists()
