"""What a finished run leaves behind: the PEFT adapter and tokenizer, an Ollama Modelfile, a README of the
run, and (--merge) merged 16-bit weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rigplan.estimator.plan import Plan
from rigplan.trainer.engine import model_source


def modelfile(plan: Plan, adapter_dir: str = "./adapter") -> str:
    """An Ollama Modelfile: FROM the base model, ADAPTER the safetensors adapter directory
    (https://github.com/ollama/ollama/blob/main/docs/modelfile.md#adapter). Ollama needs the base as a
    local directory or an Ollama model name; a hub id is written as given, with a note."""
    path, local = model_source(plan.model_path)
    base = str(Path(path).resolve()) if local else path
    note = "" if local else (
        f"# {base} is a Hugging Face id: download it (huggingface-cli download {base} --local-dir base)\n"
        "# and point FROM at that directory, or use the matching Ollama model name.\n")
    return f"{note}FROM {base}\nADAPTER {adapter_dir}\n"


def run_readme(plan: Plan, report: dict[str, Any], summary: dict[str, Any]) -> str:
    m, p = summary.get("measured", {}), summary.get("predicted", {})

    def fmt(x: Any, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    return "\n".join([
        f"# rigplan run: {plan.model} ({plan.method}, rank {plan.rank})",
        "",
        f"Status: {summary['status']} after {summary['global_step']} steps ({summary['engine']} engine).",
        f"Plan: micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation, seq {plan.seq_len}, "
        f"lr {plan.learning_rate}, {plan.epochs:g} epoch(s), {plan.optimizer}, checkpointing {plan.checkpointing}.",
        f"Data: {report['file']} ({report['format']}), {report['train_examples']} train / {report['eval_examples']} eval "
        f"examples, {report['tokens']:,} tokens, p95 length {report['length_p95']}, {report['overlong']} over seq "
        f"({report['overlong_action']}), {report['bad_records']} bad record(s); {report['batching']} micro-batches "
        f"of at most {report['token_budget']:,} tokens, {report['fill']:.0%} real tokens.",
        f"Loss: first {fmt(summary.get('first_loss'), '.4f')}, final {fmt(summary.get('final_loss'), '.4f')}, "
        f"best eval {fmt(summary.get('best_eval_loss'), '.4f')}.",
        "",
        "| | measured | plan predicted |",
        "|---|---:|---:|",
        f"| peak allocated GiB | {fmt(m.get('peak_allocated_gib'))} | {fmt(p.get('peak_allocated_gib'))} |",
        f"| peak reserved GiB | {fmt(m.get('peak_reserved_gib'))} | {fmt(p.get('peak_reserved_gib'))} |",
        f"| nvidia-smi GiB (peak sampled) | {fmt(m.get('nvml_peak_used_gib'))} | {fmt(p.get('total_gib'))} |",
        f"| tokens/s | {fmt(m.get('tokens_per_s'), ',.0f')} | {fmt(p.get('tokens_per_s'), ',.0f')} |",
        "",
        # The plan's speed is for examples of the length it was told or estimated from characters (or for full
        # sequences); the tokenizer's count can differ, and a different length is a different speed.
        f"Tokens per example: {report['tokens'] / max(1, report['examples']):,.0f} tokenized; the plan's speed is "
        + (f"for {plan.example_tokens:,.0f}, as planned." if plan.example_tokens
           else f"for full sequences of {plan.seq_len:,}."),
        "",
        "Files: `adapter/` (PEFT safetensors + tokenizer), `Modelfile` (Ollama), `plan.json`, `data_report.json`,",
        "`metrics.jsonl`, `checkpoints/`, `run_summary.json`.",
        "",
    ])


def merge_and_save(plan: Plan, adapter_dir: Path, out_dir: Path, tokenizer: Any) -> Path:
    """Merged 16-bit weights: the base reloaded in bf16 (never the 4-bit one), the adapter merged in, and the
    tokenizer beside them (without it, AutoTokenizer on the folder loaded a one-token tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, local = model_source(plan.model_path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=local)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def full_adapter_state(model: Any) -> dict[str, Any]:
    """The adapter's weights whole, on the CPU, from a model FSDP has sharded (its parameters DTensors, each
    process holding a slice, on the CPU too where the plan offloads): every process must call this, since the
    gathering is a collective. Only the trainable (LoRA) parameters are gathered, never the frozen base
    (torch.distributed.checkpoint's get_model_state_dict: full_state_dict, ignore_frozen_params); rank 0 gets
    them (cpu_offload), the others an empty dict."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    dist.barrier()  # no process goes on (and maybe exits) with a piece of the gathering still in flight
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}  # a tied embedding comes along; the adapter alone


def write_outputs(model: Any, tokenizer: Any, plan: Plan, out: Path, report: dict[str, Any],
                  summary: dict[str, Any], merge: bool, adapter_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """adapter_state: the adapter gathered from a sharded model (full_adapter_state), else the model's own."""
    adapter = out / "adapter"
    model.save_pretrained(adapter, **({"state_dict": adapter_state} if adapter_state is not None else {}))
    tokenizer.save_pretrained(adapter)
    (out / "Modelfile").write_text(modelfile(plan))
    (out / "README.md").write_text(run_readme(plan, report, summary))
    files = {"adapter": str(adapter), "modelfile": str(out / "Modelfile")}
    if merge and summary["status"] in ("done", "early_stopped"):
        files["merged"] = str(merge_and_save(plan, adapter, out / "merged", tokenizer))
    (out / "files.json").write_text(json.dumps(files, indent=2) + "\n")
    return files
