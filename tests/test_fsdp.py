"""Sharded training (FSDP2 through transformers' Trainer and accelerate) as far as a CPU can show it: accelerate
turns FSDP on for GPU processes only, so the run itself is measured on GPUs (bench/record_fsdp.sh). Here: the
plan's FSDP settings become accelerate's plugin arguments; the adapter of a sharded model is gathered whole and
written so that PEFT loads it back (two processes, gloo); the CLI's --parallelism override and refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from click.testing import CliRunner  # noqa: E402

from rigplan import planning  # noqa: E402
from rigplan.cli import main  # noqa: E402
from rigplan.profiles.catalog import resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toy_llama_and_data) -> tuple[Path, Path]:
    return toy_llama_and_data(tmp_path_factory.mktemp("fsdp"), 32)


def test_a_sharded_plan_becomes_accelerates_fsdp2_plugin(setup, tmp_path) -> None:
    from rigplan.trainer.options import RunOptions
    from rigplan.trainer.run import sft_config_from_plan

    model, data = setup
    plan = dataclasses.replace(planning.make_plan(str(model), None, data_file=data, allow_cpu=True),
                               parallelism="fsdp", num_gpus=2, cpu_offload=True, checkpointing="unsloth")
    args = sft_config_from_plan(plan, tmp_path, RunOptions(data=data, out_dir=tmp_path), has_eval=False, cuda=False,
                                bf16=False)
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "cpu_offload": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": False, "state_dict_type": "SHARDED_STATE_DICT", "activation_checkpointing": True,
        "reshard_after_forward": True}
    assert not args.gradient_checkpointing  # FSDP's activation checkpointing instead (both at once is an error)
    ddp = dataclasses.replace(plan, parallelism="ddp")
    args = sft_config_from_plan(ddp, tmp_path, RunOptions(data=data, out_dir=tmp_path), has_eval=False, cuda=False,
                                bf16=False)
    assert args.fsdp_plugin_args is None


def test_a_sharded_plan_turns_off_the_full_eval_that_moves_the_model_onto_the_gpu(setup) -> None:
    """Unsloth's SFTTrainer turns on bf16 full evaluation, and with it transformers' train() moved the whole model
    onto each GPU before FSDP sharded it (the 80-layer 70B ran out of memory on 24 GiB at step 0: bench/results/
    h200x2-fsdp/full-depth/before-fix/). A sharded plan turns it off; other plans keep what the trainer set."""
    import types

    from rigplan.trainer.run import keep_off_gpu_until_sharded

    model, data = setup
    plan = dataclasses.replace(planning.make_plan(str(model), None, data_file=data, allow_cpu=True),
                               parallelism="fsdp", num_gpus=2)
    args = types.SimpleNamespace(bf16_full_eval=True, fp16_full_eval=True)
    keep_off_gpu_until_sharded(args, plan)
    assert not args.bf16_full_eval and not args.fp16_full_eval
    args = types.SimpleNamespace(bf16_full_eval=True, fp16_full_eval=False)
    keep_off_gpu_until_sharded(args, dataclasses.replace(plan, parallelism="ddp"))
    assert args.bf16_full_eval


def test_offloading_to_the_cpu_adds_gloo_for_the_cpu_collectives(setup) -> None:
    """A sharded plan that offloads keeps its gradients in CPU memory, and clipping them all-reduces CPU tensors:
    on GPUs the process group carries those on gloo beside NCCL (two H200s failed without it: bench/results/
    h200x2-fsdp/offload-prequantized/fsdp-offload-failed.log); otherwise accelerate's default."""
    from rigplan.trainer.run import process_backend

    model, data = setup
    plan = dataclasses.replace(planning.make_plan(str(model), None, data_file=data, allow_cpu=True),
                               parallelism="fsdp", num_gpus=2, cpu_offload=True)
    assert process_backend(plan, cuda=True, world_size=2) == "cuda:nccl,cpu:gloo"
    assert process_backend(dataclasses.replace(plan, cpu_offload=False), cuda=True, world_size=2) is None
    assert process_backend(dataclasses.replace(plan, parallelism="ddp", cpu_offload=False), True, 2) is None
    assert process_backend(plan, cuda=False, world_size=2) == "gloo"
    assert process_backend(plan, cuda=True, world_size=1) is None


def test_a_sharded_adapter_is_gathered_whole_and_loads_back(setup, tmp_path) -> None:
    model, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "fsdp_worker.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(worker), str(model), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"sharded": True, "same": True, "reloaded": True, "extra": [], "tensors": result["tensors"]}
    assert result["tensors"] == 2 * 2 * resolve_model(str(model)).num_hidden_layers  # A and B, q and v, per layer


def test_parallelism_override_and_its_refusals(setup, tmp_path) -> None:
    model, data = setup
    base = dataclasses.replace(planning.make_plan(str(model), None, data_file=data, allow_cpu=True), num_gpus=2,
                               parallelism="ddp", engine="unsloth")
    sharded = planning.override(base, {"parallelism": "fsdp"})
    assert (sharded.parallelism, sharded.engine) == ("fsdp", "transformers")  # Unsloth does not shard
    runner = CliRunner()
    r = runner.invoke(main, ["run", str(model), "--data", str(data), "--parallelism", "fsdp", "--out",
                             str(tmp_path / "a")])
    assert r.exit_code == 2 and "--gpus" in r.output and not (tmp_path / "a").exists()
    r = runner.invoke(main, ["run", str(model), "--data", str(data), "--gpus", "2", "--parallelism", "fsdp",
                             "--engine", "unsloth", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "Unsloth does not shard" in r.output and not (tmp_path / "b").exists()
    r = runner.invoke(main, ["run", str(model), "--data", str(data), "--gpus", "2", "--parallelism", "ddp",
                             "--cpu-offload", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--parallelism fsdp" in r.output and not (tmp_path / "c").exists()


def test_cpu_offload_is_an_override_re_estimated() -> None:
    """--cpu-offload on a sharded plan (how the offload path is run at reduced depth, where the planner would not
    choose it): the frozen weights leave the GPU and the CPU memory they take is said (the 4-bit shards, 36.8 GiB for
    both processes, on top of the checkpoint each process maps)."""
    sharded = planning.make_plan("unsloth/Meta-Llama-3.1-70B-bnb-4bit", "h100-sxm", num_gpus=2, methods=("qlora",))
    sharded = planning.override(sharded, {"parallelism": "fsdp", "cpu_offload": False}, force=True)
    offloaded = planning.override(sharded, {"cpu_offload": True})
    assert offloaded.cpu_offload and offloaded.cpu_memory_gib - sharded.cpu_memory_gib == pytest.approx(36.8, abs=0.1)
    assert offloaded.peak_reserved_gib < sharded.peak_reserved_gib - 10


def test_a_pre_quantized_copy_is_planned_to_load_into_cpu_memory() -> None:
    """Sharded QLoRA from a 4-bit checkpoint counts no whole-model load on the GPU and says the trainer loads it
    on the CPU; the plan keeps that through its JSON and re-resolves as the 4-bit copy; a model given as local
    16-bit weights is never swapped for a hub copy (it says what would load on the CPU instead)."""
    from rigplan import store
    from rigplan.estimator import memory, planner
    from rigplan.estimator.plan import Plan, Setup
    from rigplan.profiles import catalog

    base = resolve_model("llama-3.1-70b")
    copy = catalog.prequantized_copy(base)
    assert copy.prequantized and copy.hub_id == "unsloth/Meta-Llama-3.1-70B-bnb-4bit"
    assert catalog.prequantized_copy(base, "meta-llama/Llama-3.1-70B-Instruct").hub_id.endswith("Instruct-bnb-4bit")
    # never base weights for tuned ones or the other way round: Gemma 3's base (-pt) has no plain copy listed
    assert catalog.prequantized_copy(resolve_model("gemma-3-12b")) is None
    assert catalog.prequantized_copy(resolve_model("gemma-3-12b"), "google/gemma-3-12b-it").hub_id.endswith("-it-bnb-4bit")
    assert catalog.prequantized_copy(resolve_model("llama-3.3-70b")).hub_id == "unsloth/Llama-3.3-70B-Instruct-bnb-4bit"
    setup = Setup("qlora", 16, 1, 2048, 8, parallelism="fsdp", num_gpus=2, cpu_offload=True)
    assert memory.quantized_load_bytes(base, setup) > 30 * 2**30 and memory.quantized_load_bytes(copy, setup) == 0
    assert memory.loads_on_cpu(copy, setup) and not memory.loads_on_cpu(copy, dataclasses.replace(setup, num_gpus=1,
                                                                                                  parallelism="single"))
    gpu = catalog.resolve_gpu("rtx-4090")
    est = planner.estimate(copy, setup, gpu, store.reference()[0], engine="transformers")
    plan = planner.to_plan(copy, est, gpu, store.reference()[0])
    assert plan.load_on_cpu and plan.model_path == copy.hub_id
    again = Plan.from_json(plan.to_json())
    assert again.load_on_cpu and planning.plan_model(again).prequantized
    target = planning.Target(gpu, planner.usable_gib(gpu), False)
    local, _, _ = planning.best_plan(base, target, 2048, 16, num_gpus=2, model_path="/data/llama-70b")
    # 16-bit LoRA with the frozen weights offloaded fits (FSDP's pool for 16-bit layers as measured after the fix:
    # bench/results/h200x2-fsdp/after-fix/a6000/), and the reason names the 4-bit checkpoint that would need less
    assert local.fits and local.best.method == "lora" and local.best.cpu_offload
    assert "pre-quantized 4-bit checkpoint (...-bnb-4bit) would load into CPU memory" in local.reason


def test_a_uint8_4_bit_checkpoint_is_refused_for_sharding_without_unsloth(tmp_path) -> None:
    """FSDP2 shards float tensors only: a uint8-stored checkpoint (bitsandbytes' default, Unsloth's copies) needs
    Unsloth's FSDP2 hook; without Unsloth it is refused in one line before the weights load. bf16 storage passes."""
    import importlib.util
    from types import SimpleNamespace

    from rigplan.errors import RigplanError
    from rigplan.trainer.engine import require_float_storage

    require_float_storage(SimpleNamespace(quantization_config={"bnb_4bit_quant_storage": "bfloat16"}), "m")
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("Unsloth is installed here: its hook views uint8 weights as bf16")
    with pytest.raises(RigplanError, match="uint8, which FSDP cannot shard"):
        require_float_storage(SimpleNamespace(quantization_config={"load_in_4bit": True}), "unsloth/x-bnb-4bit")


def test_run_says_where_a_sharded_plan_loads_its_weights(tmp_path, monkeypatch) -> None:
    """`rigplan run llama-3.1-70b --gpu rtx-4090 --gpus 2`: the plan line names the GPUs, FSDP, the offload and the
    pre-quantized copy each process loads into CPU memory; offline, the weights' check then refuses in one line
    (exit 2) and nothing is written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "say hi " * (i + 1), "output": "hi " * 20}) + "\n"
                            for i in range(50)))
    r = CliRunner().invoke(main, ["run", "llama-3.1-70b", "--gpu", "rtx-4090", "--gpus", "2", "--data", str(data),
                                  "--dry-run", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and not (tmp_path / "o").exists()
    assert "on rtx-4090 x 2 (fsdp, frozen weights in CPU memory)" in r.output and "peak reserved per GPU" in r.output
    assert "weights unsloth/Meta-Llama-3.1-70B-bnb-4bit, loaded into CPU memory by each process" in r.output
    assert "cannot download unsloth/Meta-Llama-3.1-70B-bnb-4bit: offline" in r.output


def test_a_sharded_plan_is_held_to_the_machines_cpu_memory_before_any_process_starts() -> None:
    """70B QLoRA on two RTX 4090s from the pre-quantized copy, offloaded: each process's own memory (the offloaded
    weights, 36.8 GiB for both, and the runtimes) must fit the machine, else refused in one line; the checkpoint read
    through the page cache only warns. Nothing is said of plans that keep everything on the GPUs."""
    from rigplan import planning

    meminfo = "MemTotal:       65536000 kB\nMemFree: 1 kB\n"
    assert planning.host_memory_gib(meminfo, "max\n") == pytest.approx(62.5)
    assert planning.host_memory_gib(meminfo, str(32 * 2**30)) == pytest.approx(32.0)  # a container's limit
    assert planning.host_memory_gib(meminfo, str(2**63 - 4096)) == pytest.approx(62.5)  # cgroup v1: no limit
    assert planning.host_memory_gib("MemFree: 1 kB\n", "max") is None and planning.host_memory_gib() > 0
    p = planning.make_plan("llama-3.1-70b", "rtx-4090", num_gpus=2)
    assert p.load_on_cpu and p.cpu_offload and p.cpu_memory_gib > 100
    assert planning.cpu_memory_check(p, 256.0) == ([], None)
    problems, warning = planning.cpu_memory_check(p, 64.0)
    assert not problems and "is more than this machine's 64 GiB" in warning and "page cache" in warning
    problems, warning = planning.cpu_memory_check(p, 32.0)
    assert warning is None and len(problems) == 1
    assert "needs 47 GiB of CPU memory" in problems[0] and "--no-cpu-offload" in problems[0]
    assert "pass rigplan run --force to try anyway" in problems[0]
    assert planning.cpu_memory_check(p, 32.0, force=True) == (
        [], "--force: trying, though this plan needs 47 GiB of CPU memory for its offloaded weights and 2 processes, "
            "and this machine has 32 GiB")
    one = planning.make_plan("llama-3.1-8b", "rtx-4090")
    assert planning.cpu_memory_check(one, 1.0) == ([], None)


def test_check_on_local_gpus_holds_a_sharded_plan_to_this_machines_memory(monkeypatch) -> None:
    """`rigplan check` on two local RTX 4090s (NVML's view replaced here) says when this machine's memory cannot
    hold what the processes keep to themselves; a catalogue GPU says nothing of this machine."""
    from rigplan import planning
    from rigplan.profiles import catalog

    gpu = catalog.resolve_gpu("rtx-4090")
    monkeypatch.setattr(planning, "resolve_target", lambda _gpu: (planning.Target(gpu, 23.6, True), ""))
    monkeypatch.setattr(planning, "host_memory_gib", lambda meminfo=None: 32.0)
    d = planning.check("llama-3.1-70b", "auto", num_gpus=2)
    assert d["recommended"]["load_on_cpu"] and d["host_memory_gib"] == 32.0
    assert "needs 47 GiB of CPU memory" in d["host_memory_note"]
    text = CliRunner().invoke(main, ["check", "llama-3.1-70b", "--gpus", "2"])
    assert text.exit_code == 0 and "this machine (32 GiB of memory): this plan needs 47 GiB" in text.output
    monkeypatch.setattr(planning, "resolve_target", lambda _gpu: (planning.Target(gpu, 23.6, False), ""))
    assert "host_memory_gib" not in planning.check("llama-3.1-70b", "rtx-4090", num_gpus=2)
