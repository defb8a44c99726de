"""Speed terms: the FLOP count's structure and the throughput model's monotonic behaviour."""

from __future__ import annotations

import pytest

from rigplan.estimator import speed
from rigplan.estimator.memory import lora_params
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import resolve_gpu, resolve_model

LLAMA8B = resolve_model("llama-3.1-8b")
H100 = resolve_gpu("h100-sxm")


def test_flops_per_token_is_about_6n_with_checkpointing() -> None:
    # Frozen base: forward 2N + input-grad backward 2N + recompute 2N over the decoder (lm_head twice).
    n_decoder = LLAMA8B.num_hidden_layers * sum(i * o for _, i, o in LLAMA8B.linear_shapes())
    head = LLAMA8B.vocab_size * LLAMA8B.hidden_size
    f = speed.flops_per_token(LLAMA8B, Setup("lora", 16, 1, 2048))
    attention = f - 6 * n_decoder - 4 * head - 6 * lora_params(LLAMA8B, 16)
    assert attention == 2 * 2 * 2048 * 32 * 128 * 32 * 0.5 * 4


def test_checkpointing_off_saves_the_recompute() -> None:
    on = speed.flops_per_token(LLAMA8B, Setup("lora", 16, 1, 2048))
    off = speed.flops_per_token(LLAMA8B, Setup("lora", 16, 1, 2048, checkpointing="off"))
    assert off / on == pytest.approx(4 / 6, rel=0.05)


def test_throughput_grows_with_batch_then_saturates(coeffs) -> None:
    tps = [speed.tokens_per_s(LLAMA8B, Setup("lora", 16, b, 2048), H100, coeffs) for b in (1, 2, 4, 8)]
    assert tps == sorted(tps) and tps[-1] / tps[-2] < 1.1


def test_qlora_is_not_faster_than_lora(coeffs) -> None:
    for b in (1, 4):
        lora = speed.tokens_per_s(LLAMA8B, Setup("lora", 16, b, 2048), H100, coeffs)
        qlora = speed.tokens_per_s(LLAMA8B, Setup("qlora", 16, b, 2048), H100, coeffs)
        assert qlora <= lora


def test_slower_gpu_is_slower(coeffs) -> None:
    setup = Setup("lora", 16, 4, 2048)
    assert speed.tokens_per_s(LLAMA8B, setup, resolve_gpu("rtx-4090"), coeffs) < speed.tokens_per_s(LLAMA8B, setup, H100, coeffs)


def test_step_is_accumulation_times_micro_batch(coeffs) -> None:
    one = speed.step_s(LLAMA8B, Setup("lora", 16, 2, 2048, grad_accum=1), H100, coeffs)
    assert speed.step_s(LLAMA8B, Setup("lora", 16, 2, 2048, grad_accum=8), H100, coeffs) == pytest.approx(8 * one)
