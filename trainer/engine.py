"""The two training engines behind one signature: Unsloth on CUDA, transformers + PEFT elsewhere.

`load_unsloth(plan)` and `load_hf_peft(plan)` both return (model, tokenizer) with LoRA adapters attached.
`import unsloth` happens only here, before transformers and peft (Unsloth patches them on import).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Any, Literal

from rigplan.errors import RigplanError
from rigplan.estimator.plan import Plan

Engine = Literal["unsloth", "hf"]
GIB = 2**30


def choose_engine() -> Engine:
    """Unsloth where it can run (CUDA and the package present), transformers + PEFT otherwise."""
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "hf"


def import_engine(engine: Engine) -> None:
    """Import Unsloth first when it is the engine: it patches transformers and peft on import."""
    if engine == "unsloth":
        import unsloth  # noqa: F401


def model_source(path: str) -> tuple[str, bool]:
    """Where weights and tokenizer load from: an existing local directory (user-expanded), loaded offline,
    or else a hub id as given. Every loader (engines, tokenizer, merge) goes through this."""
    local = Path(path).expanduser()
    return (str(local), True) if local.is_dir() else (path, False)


def load_unsloth(plan: Plan) -> tuple[Any, Any]:
    """Unsloth's FastLanguageModel with the plan's method, rank and checkpointing."""
    import unsloth  # noqa: F401  (must come before transformers/peft: it patches them)
    import torch
    from unsloth import FastLanguageModel

    path, local = model_source(plan.model_path)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=plan.seq_len,
        dtype=torch.bfloat16,
        load_in_4bit=plan.method == "qlora",
        local_files_only=local,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=plan.rank,
        lora_alpha=plan.alpha,
        lora_dropout=0.0,  # 0 lets Unsloth use its fused LoRA kernels
        target_modules=list(plan.target_modules),
        bias="none",
        use_gradient_checkpointing="unsloth" if plan.checkpointing == "unsloth" else False,
        random_state=plan.seed,
    )
    return model, tokenizer


def load_hf_peft(plan: Plan) -> tuple[Any, Any]:
    """Plain transformers + PEFT (bitsandbytes NF4 for QLoRA): the baseline, and the CPU path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    path, local = model_source(plan.model_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local}
    if plan.method == "qlora":
        if not cuda:
            raise RigplanError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); pass --method lora on this machine")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if cuda:
        kwargs["device_map"] = {"": 0}
        kwargs["attn_implementation"] = "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    if plan.checkpointing == "unsloth":
        # PEFT's own checkpointing: non-reentrant, inputs made to require grad so the frozen base backprops.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(plan.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def load(plan: Plan, engine: Engine | None = None) -> tuple[Any, Any]:
    """The one place the engine is chosen."""
    engine = engine or choose_engine()
    return load_unsloth(plan) if engine == "unsloth" else load_hf_peft(plan)


def provenance() -> dict[str, Any]:
    """GPU, driver, CUDA and package versions, date and command: what a measurement needs to be reused."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "bitsandbytes", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import pynvml  # nvidia-ml-py, a base dependency

    driver = None
    total = None
    try:
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total / GIB
    except pynvml.NVMLError as e:  # no driver (a CPU probe): record why rather than fail
        driver = f"unavailable: {e}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else platform.processor()
    # The host matters: small micro-batches wait on the CPU (estimator/speed.py's host floor). boot_id tells
    # two machines with the same name apart.
    boot = Path("/proc/sys/kernel/random/boot_id")
    return {"gpu": gpu, "gpu_total_gib": total, "driver": driver, "cuda": torch.version.cuda,
            "host": platform.node(), "boot_id": boot.read_text().strip() if boot.exists() else None, "cpu": cpu, "python": platform.python_version(), "packages": versions,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
