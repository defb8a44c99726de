"""The per-family terms fitted on recorded GPU runs, recomputed from those rows (no GPU): each constant in the
estimator that came from one or two runs, what those runs give it now, and the value in the code. The estimator
cites this script beside each constant; tests/test_issue17_runs.py checks that the two agree, so a change to the
other terms that would move a fit shows.

    python bench/family_terms.py
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import issue17_rows  # bench/
from rigplan import store
from rigplan.calibration.replica import reduced
from rigplan.estimator import memory, planner, speed
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import GpuSpec, ModelSpec, resolve_gpu, resolve_model

RESULTS = Path(__file__).parent / "results"
# Every memory term is fitted on rows from a process of their own, as a user's run is (bench/issue17_rows.py
# in_a_process_of_its_own): a probe job run after another in the same process starts with its leftovers. The QLoRA
# rows of h200-gpt-oss/, h200-issue17/ (Qwen3-MoE, Gemma 3) and h200-issue17-heldout2/ did; each shape was probed
# again in a process of its own (h200-issue17-expandable/, -fresh-process/), and those rows stand in for them.
# Speed terms keep the rows they were fitted on.
PHI = [RESULTS / "h200-issue17-heldout2" / "probe-phi.jsonl"]
PHI_QLORA = PHI + [RESULTS / "h200-issue17-heldout2" / "probe-phi-8192.jsonl"]
FRESH = RESULTS / "h200-issue17-fresh-process"
PHI_OWN = [FRESH / "probe-phi.jsonl"]  # its QLoRA 1 x 2048 and 4 x 2048 of PHI, from a process of their own
GPT_OSS = [RESULTS / "h200-gpt-oss" / "probe-gptoss.jsonl"]
GPT_OSS_AUTOCAST = [RESULTS / "h200-issue17-autocast-lora" / "probe-gptoss.jsonl"]  # GPT_OSS's LoRA shapes under it
GPT_OSS_FULL = [RESULTS / "h200-issue17-full-depth" / "probe-gptoss-full.jsonl"]  # 24 layers, under autocast
GPT_OSS_OWN = [RESULTS / "h200-issue17-heldout3" / "probe-gptoss.jsonl"]
QWEN2_MOE = [RESULTS / "h200-issue17-heldout5" / "probe-qwen2moe.jsonl"]  # its first runs training what was planned
QWEN2_MOE_DEEP = [RESULTS / "h200-issue17-heldout8" / "probe-qwen2moe.jsonl"]  # at 16 and 24 (full) layers
QWEN2_MOE_LONG = [RESULTS / "h200-issue17-heldout9" / "probe-qwen2moe.jsonl"]
QWEN2_MOE_AUTOCAST = [RESULTS / "h200-issue17-autocast" / "probe-qwen2moe.jsonl"]  # 16-bit LoRA under autocast
QWEN3_MOE = [RESULTS / "h200-issue17" / "probe-qwen3moe.jsonl"]
QWEN3_MOE_AUTOCAST = [RESULTS / "h200-issue17-autocast" / "probe-qwen3moe.jsonl"]  # its LoRA 1 x 8192 under it
QWEN3_MOE_OWN = [RESULTS / "h200-issue17-expandable" / "probe-qwen3moe.jsonl"]  # its QLoRA shapes of QWEN3_MOE
MIXTRAL_L8 = [RESULTS / "h200-issue17-doublequant" / "probe-mixtral.jsonl",
              RESULTS / "h200-issue17-mixtral-long" / "probe-mixtral-L8.jsonl"]
MIXTRAL_LORA = [RESULTS / "h200-issue17-autocast-lora" / "probe-mixtral.jsonl"]  # 16-bit LoRA under autocast
GEMMA3 = [RESULTS / "h200-issue17" / "probe-gemma3.jsonl"]
GEMMA3_OWN = [RESULTS / "h200-issue17-expandable" / "probe-gemma3.jsonl", FRESH / "probe-gemma3.jsonl"]
FIRST_SHAPES = ((1, 2048), (4, 2048), (1, 8192))  # the shapes of h200-issue17/, which the QLoRA slacks were fitted on
# 16-bit LoRA under bf16 autocast, as `rigplan run` trains; the rows above were probed without it
AUTOCAST = RESULTS / "h200-issue17-autocast-next"
PHI_AUTOCAST = [AUTOCAST / "probe-phi.jsonl"]
GEMMA3_AUTOCAST = [AUTOCAST / "probe-gemma3.jsonl"]
QWEN3_MOE_LONG = [RESULTS / "h200-issue17-heldout8" / "probe-qwen3moe.jsonl",
                  RESULTS / "h200-issue17-fit6" / "probe-qwen3moe-qlora-long.jsonl"]


def recorded(files: list[Path], method: str) -> list[dict]:
    """The method's rows in files that trained (no error)."""
    found = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    return [r for r in found if r["method"] == method and not r.get("err")]


def rows(files: list[Path], method: str, batch: int, seq: int, layers: int | None = None) -> dict:
    """The one row of that shape (at that depth, where the files hold several)."""
    (row,) = [r for r in recorded(files, method) if (r["batch"], r["seq"]) == (batch, seq)
              and layers in (None, r["layers"])]
    return row


def model_setup(row: dict) -> tuple[ModelSpec, Setup, GpuSpec]:
    model = resolve_model(row["model"].split("-L")[0])
    if row["layers"] != model.num_hidden_layers:
        model = reduced(model, row["layers"])
    setup = Setup(row["method"], row["rank"], row["batch"], row["seq"], checkpointing=row["checkpointing"])
    return model, setup, resolve_gpu(row["provenance"]["gpu"].removeprefix("NVIDIA ").lower())


def _estimate(row: dict) -> planner.Estimate:
    model, setup, gpu = model_setup(row)
    return planner.estimate(model, setup, gpu, store.reference()[0])


def _allocated(row: dict) -> float:
    """As probed: with what a probe without autocast keeps beyond a run (issue17_rows.without_autocast_gib)."""
    return _estimate(row).peak_allocated_gib + issue17_rows.without_autocast_gib(row)


def _reserved(row: dict) -> float:
    """As probed (_allocated)."""
    return _estimate(row).peak_reserved_gib + issue17_rows.without_autocast_gib(row)


@contextlib.contextmanager
def zeroed(table: dict, key: object) -> Iterator[None]:
    """The estimate without a fitted constant (table[key] at 0, or each of its values), the table left as it was."""
    saved = table[key]
    table[key] = tuple(0.0 for _ in saved) if isinstance(saved, tuple) else 0.0
    try:
        yield
    finally:
        table[key] = saved


@contextlib.contextmanager
def removed(table: dict, key: object) -> Iterator[None]:
    """The estimate without a family's entry (table[key] absent), the table left as it was."""
    saved = table.pop(key)
    try:
        yield
    finally:
        table[key] = saved


def through_zero(xs: list[float], ys: list[float]) -> float:
    """Least squares through zero: the b of y = b x."""
    return sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares: the a and b of y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _per_token(row: dict, width: Callable[[ModelSpec], int]) -> float:
    """The row's tokens x a width of its model (width(model)), in units of 2**30."""
    model, setup, _ = model_setup(row)
    return setup.tokens * width(model) / 2**30


def bisect_constant(table: dict, key: object, hi: float, short: Callable[[], bool]) -> float:
    """The value of table[key] (a memory term's constant) between 0 and hi at which short() (whether the estimate,
    which grows with it, is still below what was measured) turns false, by bisection; the table is left as it was."""
    saved, lo = table[key], 0.0
    try:
        for _ in range(60):
            table[key] = mid = (lo + hi) / 2
            lo, hi = (mid, hi) if short() else (lo, mid)
    finally:
        table[key] = saved
    return (lo + hi) / 2


def solve(table: dict, key: object, row: dict, hi: float) -> float:
    """The value of table[key] at which the row's estimated allocated peak meets the measured one."""
    return bisect_constant(table, key, hi, lambda: _allocated(row) < row["peak_alloc_gib"])


def step_parts(row: dict) -> tuple[float, float, float]:
    """A micro-batch's estimated GPU seconds without the family's factors: matmuls, attention (at the softmax
    bound), and memory-bound work."""
    model, setup, gpu = model_setup(row)
    coeffs = store.reference()[0]
    rate = gpu.tensor_tflops * 1e12 * coeffs.mfu
    mm = speed.matmul_flops_per_token(model, setup) * setup.tokens / rate
    softmax = max(1.0, speed.SOFTMAX_BOUND_HEAD_DIM / model.head_dim)
    attn = softmax * speed.attention_flops_per_token(model, setup) * setup.tokens / rate
    moved = (coeffs.elementwise_bytes * speed.elementwise_units(model, setup)
             + coeffs.dequant_bytes * speed.quantized_weights(model, setup)
             + speed.expert_dequant_bytes(model, setup)) / (gpu.bandwidth_gb_s * 1e9)
    return mm, attn, moved


def step_ratio(files: list[Path], method: str, batch: int, seq: int) -> float:
    """The rule Gemma 3 LoRA's factor was fitted by: the measured step over the whole estimated GPU time without the
    factor, which the estimate then applies to the FLOPs' time alone (a little less than the step's ratio; its
    held-out rows checked it so)."""
    mm, attn, moved = step_parts(row := rows(files, method, batch, seq))
    return row["step_s"] / (mm + attn + moved)


def matmul_factor(files: list[Path], method: str, batch: int, seq: int, layers: int | None = None) -> float:
    """A family's matmul factor from one GPU-bound row: the step's time less its attention (at the softmax bound) and
    memory-bound work, over its matmuls' time at the fitted rate."""
    mm, attn, moved = step_parts(row := rows(files, method, batch, seq, layers))
    return (row["step_s"] - attn - moved) / mm


def phi3_speed(method: str = "lora") -> tuple[float, float]:
    """Phi-3's GPU factor and attention factor for a method from its two GPU-bound rows (same tokens, 4 x 2048 and
    1 x 8192): step - moved = factor x (matmuls + attention_factor x attention), two equations."""
    files = PHI_AUTOCAST if method == "lora" else PHI_QLORA
    (m1, a1, v1), t1 = step_parts(r1 := rows(files, method, 4, 2048)), r1["step_s"]
    (m2, a2, v2), t2 = step_parts(r2 := rows(files, method, 1, 8192)), r2["step_s"]
    # u = factor, w = factor x attention_factor: u m + w a = t - v
    det = m1 * a2 - m2 * a1
    u = ((t1 - v1) * a2 - (t2 - v2) * a1) / det
    w = (m1 * (t2 - v2) - m2 * (t1 - v1)) / det
    return u, w / u


def gpt_oss_speed() -> tuple[float, float]:
    """gpt-oss's GPU factor and attention factor: the attention's from the per-token step going from 1 x 8192 to
    1 x 16384 at full depth (QLoRA, GPT_OSS_FULL: the matmuls' share per token is the same in both), the GPU factor
    then from its LoRA 4 x 2048 row (GPT_OSS), as before. u m + w a = t - v, w = factor x attention factor."""
    short, long = rows(GPT_OSS_FULL, "qlora", 1, 8192), rows(GPT_OSS_FULL, "qlora", 1, 16384)
    (_, a1, v1), (_, a2, v2) = step_parts(short), step_parts(long)
    per_token = (long["step_s"] - v2) / long["seq"] - (short["step_s"] - v1) / short["seq"]
    w = per_token / (a2 / long["seq"] - a1 / short["seq"])
    m0, a0, v0 = step_parts(first := rows(GPT_OSS, "lora", 4, 2048))
    u = (first["step_s"] - v0 - w * a0) / m0
    return u, w / u


def moe_qlora_backward(model_type: str, short: dict, long: dict) -> tuple[float, float]:
    """memory.MOE_QLORA_BACKWARD_BY_TYPE[model_type]: allocated GiB = the estimate's other terms + f x the recompute
    transient as the reference counts it + c x the gate_up stack, through two QLoRA rows of one depth."""
    (t1, y1), (t2, y2) = backward_held(short), backward_held(long)
    f = (y2 - y1) / (t2 - t1)
    return f, (y1 - f * t1) / (memory.gate_up_stack_bytes(model_setup(short)[0]) / 2**30)


def backward_held(row: dict) -> tuple[float, float]:
    """(a layer's recompute transient as the reference counts it, what the row's backward held of it and beside it),
    GiB: the allocated peak less the estimate's other terms, as probed (a run's recompute less the recomputed layer's
    input copies, and what a probe without autocast keeps beyond a run)."""
    model, setup, _ = model_setup(row)
    parts = _estimate(row).components_bytes
    phases = ("recompute_transient", "loss_over_backward", "expert_dequant", "quantized_load")
    others = sum(parts[k] for k in memory.ALLOCATED_TERMS if k not in phases) / 2**30
    beyond_run = issue17_rows.without_autocast_gib(row) - memory.without_autocast_bytes(model, setup) / 2**30
    transient = memory.recompute_transient_bytes(model, setup, store.reference()[0]) / 2**30
    return transient, row["peak_alloc_gib"] - others - beyond_run


def moe_lora_backward(row: dict) -> float:
    """memory.MOE_LORA_BACKWARD_BY_TYPE: the share of the recompute transient the row's 16-bit LoRA backward held."""
    transient, held = backward_held(row)
    return held / transient


def qwen3_moe_qlora_backward() -> tuple[float, float]:
    """Through Qwen3-MoE's QLoRA 1 x 16384 and 1 x 32768 rows at 4 layers."""
    return moe_qlora_backward("qwen3_moe", rows(QWEN3_MOE_LONG, "qlora", 1, 16384),
                              rows(QWEN3_MOE_LONG, "qlora", 1, 32768))


def qwen2_moe_qlora_backward() -> tuple[float, float]:
    """Through Qwen1.5-MoE's QLoRA 2 x 8192 and 4 x 8192 rows at 8 layers."""
    return moe_qlora_backward("qwen2_moe", rows(QWEN2_MOE_LONG, "qlora", 2, 8192),
                              rows(QWEN2_MOE_LONG, "qlora", 4, 8192))


def mixtral_qlora_backward() -> tuple[float, float]:
    """Through Mixtral's QLoRA 1 x 16384 and 1 x 32768 rows at 8 layers, each from a process of its own."""
    return moe_qlora_backward("mixtral", rows(MIXTRAL_L8, "qlora", 1, 16384), rows(MIXTRAL_L8, "qlora", 1, 32768))


def phi3_mask() -> float:
    """Bytes per mask element from the LoRA pair at the same tokens: what 1 x 8192 held beyond 4 x 2048, over
    the difference in micro_batch x seq x seq."""
    short, long = rows(PHI, "lora", 4, 2048), rows(PHI, "lora", 1, 8192)
    elements = long["batch"] * long["seq"] ** 2 - short["batch"] * short["seq"] ** 2
    return (long["peak_alloc_gib"] - short["peak_alloc_gib"]) * 2**30 / elements


PHI_LONG = [RESULTS / "h200-issue17-heldout3" / "probe-phi.jsonl"]


def phi3_transient() -> float:
    """memory.TRANSIENT_PER_KV_BY_TYPE["phi3"]: bytes per token and unit of key/value width that Phi-3.5's QLoRA
    rows at 2 x 4096 and 1 x 16384 allocated beyond the other terms (estimated without it), least squares through
    zero."""
    fit = [rows(PHI_LONG, "qlora", batch, seq) for batch, seq in ((2, 4096), (1, 16384))]
    with zeroed(memory.TRANSIENT_PER_KV_BY_TYPE, "phi3"):
        ys = [r["peak_alloc_gib"] - _allocated(r) for r in fit]
    return through_zero([_per_token(r, memory.kv_width) for r in fit], ys)


def phi3_qlora_slack() -> tuple[float, float]:
    """memory.QLORA_SLACK_GIB_BY_TYPE["phi3"] and QLORA_SLACK_PER_KV_BY_TYPE["phi3"]: measured less estimated
    reserved GiB (estimated without them) = a + b x tokens x key/value width / 2**30, least squares over the rows
    1 x 2048, 4 x 2048 (fresh-process) and 2 x 4096, 1 x 16384 (heldout3)."""
    fit = [rows(PHI_OWN, "qlora", 1, 2048), rows(PHI_OWN, "qlora", 4, 2048), rows(PHI_LONG, "qlora", 2, 4096),
           rows(PHI_LONG, "qlora", 1, 16384)]
    with zeroed(memory.QLORA_SLACK_GIB_BY_TYPE, "phi3"), zeroed(memory.QLORA_SLACK_PER_KV_BY_TYPE, "phi3"):
        ys = [r["peak_reserved_gib"] - _reserved(r) for r in fit]
    return least_squares([_per_token(r, memory.kv_width) for r in fit], ys)


MIXTRAL_NOCKPT = [RESULTS / "h200-issue17-nockpt-fit" / "probe-mixtral.jsonl"]


def nockpt_slack(table: dict, key: object, method: str, files: list[Path],
                 seqs: tuple[int, ...]) -> tuple[float, float]:
    """memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD[model_type, method] (or NOCKPT_SLACK_BY_TYPE[model_type]): measured less
    estimated reserved GiB (estimated with it at 0) = a + b x tokens x hidden / 2**30, least squares over the method's
    4-layer 1 x seq rows without checkpointing."""
    fit = [rows(files, method, 1, seq, layers=4) for seq in seqs]
    with zeroed(table, key):
        ys = [r["peak_reserved_gib"] - _reserved(r) for r in fit]
    return least_squares([_per_token(r, lambda m: m.hidden_size) for r in fit], ys)


def nockpt_qlora_slack() -> tuple[float, float]:
    """Mixtral's, through its 1 x 2048, 1 x 16384 and 1 x 32768 rows."""
    return nockpt_slack(memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD, ("mixtral", "qlora"), "qlora", MIXTRAL_NOCKPT,
                        (2048, 16384, 32768))


QWEN3_MOE_NOCKPT = [RESULTS / "h200-issue17-nockpt" / "probe-qwen3moe.jsonl",
                    RESULTS / "h200-issue17-nockpt-check" / "probe-qwen3moe.jsonl"]
QWEN2_MOE_NOCKPT = [RESULTS / "h200-issue17-nockpt-deep" / "probe-qwen2moe.jsonl",
                    RESULTS / "h200-issue17-nockpt-qwen2moe" / "probe-qwen2moe.jsonl"]


def kept_by_the_extra_layers_gib(short: dict, deep: dict) -> float:
    """What the deeper replica's extra layers kept at the same shape: its allocated peak less the shallower one's,
    each with its weights (as measured after loading) taken out."""
    return deep["peak_alloc_gib"] - deep["after_load_gib"] - (short["peak_alloc_gib"] - short["after_load_gib"])


def nockpt_routed_share(model_type: str, files: list[Path]) -> float:
    """memory.NOCKPT_ROUTED_SHARE_BY_TYPE[model_type]: the multiple of a layer's routed copy that makes the
    estimated allocated peak of the family's 8-layer 1 x 8192 row without checkpointing exceed the 4-layer one's by
    what was measured (the layers' weights as measured after loading)."""
    short, deep = (rows(files, "qlora", 1, 8192, layers=n) for n in (4, 8))
    measured = kept_by_the_extra_layers_gib(short, deep)

    def kept(row: dict) -> float:  # as probed: the rows ran without autocast (memory.without_autocast_bytes)
        assert row.get("autocast") in (None, "off")
        return _estimate(row).components_bytes["activations_kept"] / 2**30 + issue17_rows.without_autocast_gib(row)

    return bisect_constant(memory.NOCKPT_ROUTED_SHARE_BY_TYPE, model_type, 4.0,
                           lambda: kept(deep) - kept(short) < measured)


def qwen2_moe_lora_share() -> float:
    """memory.NOCKPT_ROUTED_SHARE_BY_TYPE_AND_METHOD["qwen2_moe", "lora"]: the share at which Qwen1.5-MoE's 8-layer
    16-bit LoRA 1 x 8192 row without checkpointing under autocast meets its allocated peak."""
    (row,) = [r for r in recorded(QWEN2_MOE_AUTOCAST, "lora")
              if r["checkpointing"] == "off"]
    return solve(memory.NOCKPT_ROUTED_SHARE_BY_TYPE_AND_METHOD, ("qwen2_moe", "lora"), row, 6.0)


def nockpt_constant_slack() -> float:
    """memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD["qwen2_moe", "qlora"][0]: the mean of measured less estimated reserved
    GiB (estimated without it) over Qwen1.5-MoE's 1 x 8192 rows without checkpointing, at 4 and at 8 layers."""
    fit = [rows(QWEN2_MOE_NOCKPT, "qlora", 1, 8192, layers=n) for n in (4, 8)]
    with zeroed(memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD, ("qwen2_moe", "qlora")):
        excess = [r["peak_reserved_gib"] - _reserved(r) for r in fit]
    return sum(excess) / len(excess)


GPT_OSS_NOCKPT = [RESULTS / "h200-issue17-gptoss-nockpt" / "probe-gptoss.jsonl"]
GPT_OSS_AUTOCAST_SLACK = [RESULTS / "h200-issue17-autocast-slack" / "probe-autocast-slack.jsonl"]


def gpt_oss_nockpt_slack() -> tuple[float, float]:
    """gpt-oss's (both methods), the line through its QLoRA 1 x 2048 and 1 x 16384 rows under autocast, as runs
    train: probes without it held more beyond their allocated peak (0.50 against 0.36 GiB at 1 x 8192)."""
    return nockpt_slack(memory.NOCKPT_SLACK_BY_TYPE, "gpt_oss", "qlora", GPT_OSS_AUTOCAST_SLACK, (2048, 16384))


def gpt_oss_host() -> float:
    """speed.HOST_LAYER_TIME_BY_TYPE["gpt_oss"]: least squares through zero of the step's seconds less the host's fixed
    cost on the layers' host seconds (estimated without it), over the 4-layer 1 x 2048 rows without checkpointing."""
    fit = [rows(GPT_OSS_NOCKPT, m, 1, 2048, layers=4) for m in ("lora", "qlora")]
    coeffs = store.reference()[0]
    with removed(speed.HOST_LAYER_TIME_BY_TYPE, "gpt_oss"):
        layers = [speed.host_floor_s(*model_setup(r)[:2], coeffs) - coeffs.step_overhead_s for r in fit]
    return through_zero(layers, [r["step_s"] - coeffs.step_overhead_s for r in fit])


def gpt_oss_swiglu(method: str) -> float:
    """memory.FP32_SWIGLU_BYTES[method]: through gpt-oss's row of 8,192 tokens at 4 layers (16-bit LoRA's 4 x 2048
    under bf16 autocast, as `rigplan run` trains; QLoRA's 2 x 4096, from a process of its own; in another, 4 x 2048
    allocated 0.09 GiB less, fresh-process/)."""
    if method == "lora":
        return solve(memory.FP32_SWIGLU_BYTES, method, rows(GPT_OSS_AUTOCAST, method, 4, 2048), 40.0)
    return solve(memory.FP32_SWIGLU_BYTES, method, rows(GPT_OSS_OWN, method, 2, 4096), 40.0)


def constant_slack(files: list[Path], model_type: str, shapes: tuple[tuple[int, int], ...] = (),
                   method: str = "qlora") -> float:
    """memory.QLORA_SLACK_GIB_BY_TYPE[model_type] (LORA_SLACK_GIB_BY_TYPE for method "lora"): the mean of measured
    less estimated reserved GiB over the family's rows of the method in files (those of the (batch, seq) shapes
    given, if any), estimated without the term."""
    table = memory.QLORA_SLACK_GIB_BY_TYPE if method == "qlora" else memory.LORA_SLACK_GIB_BY_TYPE
    found = [r for r in recorded(files, method) if not shapes or (r["batch"], r["seq"]) in shapes]
    with zeroed(table, model_type):
        excess = [r["peak_reserved_gib"] - _reserved(r) for r in found]
    return sum(excess) / len(excess)


def lora_slack(files: list[Path], model_type: str) -> float:
    """memory.LORA_SLACK_PER_HIDDEN_BY_TYPE[model_type]: bytes per token and hidden unit of measured less estimated
    reserved memory (estimated without the term) over the family's LoRA rows in files, least squares through zero."""
    lora = recorded(files, "lora")
    with zeroed(memory.LORA_SLACK_PER_HIDDEN_BY_TYPE, model_type):
        ys = [r["peak_reserved_gib"] - _reserved(r) for r in lora]
    return through_zero([_per_token(r, lambda m: m.hidden_size) for r in lora], ys)


def fitted() -> dict[str, tuple[float, float]]:
    """Each constant: (what its runs give it now, the value in the code)."""
    phi = {m: phi3_speed(m) for m in ("lora", "qlora")}
    oss = gpt_oss_speed()
    phi_slack = phi3_qlora_slack()
    moe = qwen3_moe_qlora_backward()
    mixtral = mixtral_qlora_backward()
    qwen2 = qwen2_moe_qlora_backward()
    nockpt = nockpt_qlora_slack()
    return {
        **{f'speed.GPU_TIME_BY_TYPE_AND_METHOD[("phi3", "{m}")]': (phi[m][0],
                                                                  speed.GPU_TIME_BY_TYPE_AND_METHOD[("phi3", m)])
           for m in phi},
        **{f'speed.ATTENTION_TIME_BY_TYPE_AND_METHOD[("phi3", "{m}")]': (
            phi[m][1], speed.ATTENTION_TIME_BY_TYPE_AND_METHOD[("phi3", m)]) for m in phi},
        'speed.GPU_TIME_BY_TYPE["gpt_oss"]': (oss[0], speed.GPU_TIME_BY_TYPE["gpt_oss"]),
        'speed.ATTENTION_TIME_BY_TYPE["gpt_oss"]': (oss[1], speed.ATTENTION_TIME_BY_TYPE["gpt_oss"]),
        'speed.MATMUL_TIME_BY_TYPE["qwen3_moe"]': (matmul_factor(QWEN3_MOE_AUTOCAST, "lora", 1, 8192),
                                                  speed.MATMUL_TIME_BY_TYPE["qwen3_moe"]),
        'speed.MATMUL_TIME_BY_TYPE["qwen2_moe"]': (matmul_factor(QWEN2_MOE_DEEP, "qlora", 1, 8192, layers=24),
                                                  speed.MATMUL_TIME_BY_TYPE["qwen2_moe"]),
        'speed.GPU_TIME_BY_TYPE_AND_METHOD[("gemma3", "lora")]': (
            step_ratio(GEMMA3_AUTOCAST, "lora", 4, 2048), speed.GPU_TIME_BY_TYPE_AND_METHOD[("gemma3", "lora")]),
        'speed.GPU_TIME_BY_TYPE_AND_METHOD[("gemma3", "qlora")]': (
            step_ratio(GEMMA3_OWN, "qlora", 4, 2048), speed.GPU_TIME_BY_TYPE_AND_METHOD[("gemma3", "qlora")]),
        **{f'memory.MOE_QLORA_BACKWARD_BY_TYPE["qwen3_moe"][{i}]': (
            moe[i], memory.MOE_QLORA_BACKWARD_BY_TYPE["qwen3_moe"][i]) for i in (0, 1)},
        **{f'memory.MOE_QLORA_BACKWARD_BY_TYPE["mixtral"][{i}]': (
            mixtral[i], memory.MOE_QLORA_BACKWARD_BY_TYPE["mixtral"][i]) for i in (0, 1)},
        **{f'memory.MOE_QLORA_BACKWARD_BY_TYPE["qwen2_moe"][{i}]': (
            qwen2[i], memory.MOE_QLORA_BACKWARD_BY_TYPE["qwen2_moe"][i]) for i in (0, 1)},
        'memory.MOE_LORA_BACKWARD_BY_TYPE["mixtral"]': (moe_lora_backward(rows(MIXTRAL_LORA, "lora", 1, 8192)),
                                                        memory.MOE_LORA_BACKWARD_BY_TYPE["mixtral"]),
        'memory.MOE_LORA_BACKWARD_BY_TYPE["qwen2_moe"]': (moe_lora_backward(rows(QWEN2_MOE_AUTOCAST, "lora", 2, 8192)),
                                                          memory.MOE_LORA_BACKWARD_BY_TYPE["qwen2_moe"]),
        'memory.SEQ_SQUARED_BYTES_BY_TYPE["phi3"]': (phi3_mask(), memory.SEQ_SQUARED_BYTES_BY_TYPE["phi3"]),
        'memory.TRANSIENT_PER_KV_BY_TYPE["phi3"]': (phi3_transient(), memory.TRANSIENT_PER_KV_BY_TYPE["phi3"]),
        'memory.QLORA_SLACK_GIB_BY_TYPE["phi3"]': (phi_slack[0], memory.QLORA_SLACK_GIB_BY_TYPE["phi3"]),
        'memory.QLORA_SLACK_PER_KV_BY_TYPE["phi3"]': (phi_slack[1], memory.QLORA_SLACK_PER_KV_BY_TYPE["phi3"]),
        **{f'memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD["mixtral", "qlora"][{i}]': (
            nockpt[i], memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD["mixtral", "qlora"][i]) for i in (0, 1)},
        **{f'memory.NOCKPT_ROUTED_SHARE_BY_TYPE["{t}"]': (nockpt_routed_share(t, files),
                                                         memory.NOCKPT_ROUTED_SHARE_BY_TYPE[t])
           for t, files in (("qwen3_moe", QWEN3_MOE_NOCKPT), ("qwen2_moe", QWEN2_MOE_NOCKPT))},
        'memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD["qwen2_moe", "qlora"][0]': (
            nockpt_constant_slack(), memory.NOCKPT_SLACK_BY_TYPE_AND_METHOD["qwen2_moe", "qlora"][0]),
        **{f'memory.NOCKPT_SLACK_BY_TYPE["gpt_oss"][{i}]': (gpt_oss_nockpt_slack()[i],
                                                          memory.NOCKPT_SLACK_BY_TYPE["gpt_oss"][i]) for i in (0, 1)},
        'memory.NOCKPT_ROUTED_SHARE_BY_TYPE_AND_METHOD["qwen2_moe", "lora"]': (
            qwen2_moe_lora_share(), memory.NOCKPT_ROUTED_SHARE_BY_TYPE_AND_METHOD["qwen2_moe", "lora"]),
        'speed.HOST_LAYER_TIME_BY_TYPE["gpt_oss"]': (gpt_oss_host(), speed.HOST_LAYER_TIME_BY_TYPE["gpt_oss"]),
        'memory.FP32_SWIGLU_BYTES["lora"]': (gpt_oss_swiglu("lora"), memory.FP32_SWIGLU_BYTES["lora"]),
        'memory.FP32_SWIGLU_BYTES["qlora"]': (gpt_oss_swiglu("qlora"), memory.FP32_SWIGLU_BYTES["qlora"]),
        **{f'memory.QLORA_SLACK_GIB_BY_TYPE["{t}"]': (constant_slack(files, t, FIRST_SHAPES),
                                                     memory.QLORA_SLACK_GIB_BY_TYPE[t])
           for t, files in (("qwen3_moe", QWEN3_MOE_OWN), ("gemma3_text", GEMMA3_OWN))},
        'memory.QLORA_SLACK_GIB_BY_TYPE["gpt_oss"]': (constant_slack(GPT_OSS_OWN, "gpt_oss"),
                                                     memory.QLORA_SLACK_GIB_BY_TYPE["gpt_oss"]),
        **{f'memory.LORA_SLACK_PER_HIDDEN_BY_TYPE["{t}"]': (lora_slack(files, t),
                                                           memory.LORA_SLACK_PER_HIDDEN_BY_TYPE[t])
           for t, files in (("qwen3_moe", QWEN3_MOE), ("gemma3_text", GEMMA3))},
        'memory.QLORA_SLACK_GIB_BY_TYPE["qwen2_moe"]': (constant_slack(QWEN2_MOE, "qwen2_moe", ((1, 2048),)),
                                                       memory.QLORA_SLACK_GIB_BY_TYPE["qwen2_moe"]),
        'memory.LORA_SLACK_GIB_BY_TYPE["qwen2_moe"]': (
            constant_slack(QWEN2_MOE, "qwen2_moe", ((1, 2048),), "lora"), memory.LORA_SLACK_GIB_BY_TYPE["qwen2_moe"]),
    }


if __name__ == "__main__":
    for name, (fit, code) in fitted().items():
        print(f"{name:55s} fitted {fit:8.3f}   in the code {code:8.3f}")
