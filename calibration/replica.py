"""A random-weight model directory built from a ModelSpec's facts, and a tokenizer made in code.

Memory and step time depend on shapes, not weight values, so a replica measures what the real model would,
with nothing downloaded. Depth can be reduced (`num_layers`) for quick calibration probes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rigplan.profiles.catalog import ModelSpec
from rigplan.data import DEFAULT_CHAT_TEMPLATE

# The words of the code-made tokenizer; ids past them exist in the model's vocabulary all the same.
TOKENIZER_WORDS = 4_000
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def reduced(spec: ModelSpec, num_layers: int | None) -> ModelSpec:
    """The same architecture with fewer decoder layers (None: full depth)."""
    if num_layers is None or num_layers == spec.num_hidden_layers:
        return spec
    return dataclasses.replace(spec, id=f"{spec.id}-L{num_layers}", num_hidden_layers=num_layers,
                               layer_types=spec.layer_types[:num_layers])  # the first layers' attention kinds


# Toy widths for CPU tests and smoke runs: the profile's architecture (model type, bias, tying) kept, sizes
# shrunk. The vocabulary covers every id of the code-made tokenizer, whichever tokenizer class
# AutoTokenizer picks for the model type (Qwen2Tokenizer splits words into the tokenizer's 4,053 ids).
TOY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=4096)


def toy(spec: ModelSpec) -> ModelSpec:
    """The same architecture at toy size, for CPU tests."""
    return dataclasses.replace(spec, id=f"tiny-{spec.id}", layer_types=spec.layer_types[:TOY_SIZES["num_hidden_layers"]],
                               **TOY_SIZES)


def hf_config(spec: ModelSpec, vocab_size: int | None = None) -> Any:
    """A transformers config holding the spec's facts (model_type picks the modeling code)."""
    from transformers import AutoConfig

    facts: dict[str, Any] = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        vocab_size=vocab_size or spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if spec.rope_theta is not None:
        facts["rope_theta"] = spec.rope_theta
    # Mixture-of-experts facts under the config's own keys (Mixtral: num_local_experts; Qwen3-MoE: num_experts).
    for key in ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size"):
        if getattr(spec, key):
            facts[key] = getattr(spec, key)
    if spec.dense_layers:  # Qwen-MoE's dense layers among the experts, cut to the replica's depth
        facts["decoder_sparse_step"] = 1
        facts["mlp_only_layers"] = [i for i in spec.dense_layer_ids if i < spec.num_hidden_layers]
    if spec.model_type in ("llama", "gpt_oss"):
        facts["attention_bias"] = spec.attention_bias
    if spec.model_type == "qwen2_moe":  # Qwen2MoeConfig's name for it
        facts["qkv_bias"] = spec.attention_bias
    if spec.layer_types:
        # The profile's per-layer attention (gpt-oss: sliding_attention, full_attention, ...), cut to the replica's
        # depth (reduced(), toy()) and repeated past the profile's where a replica is deeper.
        n, kinds = spec.num_hidden_layers, spec.layer_types
        facts["layer_types"] = [kinds[i % len(kinds)] for i in range(n)]
    # Always explicit: MistralConfig defaults to sliding_window=4096, which Mistral-7B-v0.3 does not use
    # (a replica with it ran 37% slower at 2 x 8192 on the H100).
    facts["sliding_window"] = spec.sliding_window
    if spec.architectures:
        facts["architectures"] = list(spec.architectures)
    return AutoConfig.for_model(spec.model_type, **facts)


def make_tokenizer(words: int = TOKENIZER_WORDS) -> Any:
    """A word-level tokenizer with bos/eos/pad and a chat template, made without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for extra in ("<|im_start|>", "<|im_end|>"):
        vocab[extra] = len(vocab)
    for i in range(words):
        vocab[f"w{i}"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_replica(spec: ModelSpec, out_dir: Path, device: str = "cpu", vocab_size: int | None = None,
                  dtype: str = "bfloat16", seed: int = 0, init_std: float | None = None) -> Path:
    """Write a random-weight model + tokenizer to out_dir, loadable by from_pretrained. init_std (default:
    the config's 0.02) matters only for toy widths that must learn: at hidden 64 a 0.02 lm_head caps every
    logit near 1, so no adapter can lower the loss much."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(spec, vocab_size)
    if init_std is not None:
        config.initializer_range = init_std
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    make_tokenizer().save_pretrained(out_dir)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out_dir
