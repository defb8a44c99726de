"""The two training engines behind one signature; the Plan names which (planning chooses it, once).

`load_unsloth(plan)` and `load_hf_peft(plan)` both return (model, tokenizer) with LoRA adapters attached.
`import unsloth` happens only here, before transformers and peft (Unsloth patches them on import).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from rigplan.errors import RigplanError
from rigplan.estimator.plan import Plan

GIB = 2**30


# Padded micro-batches change shape from one to the next (trainer/batching.py), which fragments torch's caching
# allocator: on the H200 an RTX 4090 QLoRA plan (micro-batch 2 x 1,280) reserved 2.35 GiB beyond its 15.36 GiB
# allocated (bench/results/h200-runs/grouped/4090-qlora.json), where fixed shapes leave ~0.1 GiB. Expandable
# segments grow one mapping instead of caching blocks of every size (https://pytorch.org/docs/stable/
# notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf). torch 2.11 reads PYTORCH_ALLOC_CONF.
ALLOC_CONF = "expandable_segments:True"


def configure_allocator() -> None:
    """Expandable segments for this process, unless the user set an allocator configuration; must run before
    CUDA's first allocation (rigplan run calls it first thing)."""
    import os

    if not any(os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_ALLOC_CONF"] = ALLOC_CONF


# What `rigplan run` imports: pyproject.toml's [train] extra (the base install is check's, without torch).
TRAIN_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")
# Seconds to wait for the Hugging Face hub before calling it unreachable: without a network a download retried
# for 52 s, then printed a 100-line OSError (issue 15).
HUB_TIMEOUT_S = 10


def require_training_packages(command: str = "rigplan run") -> None:
    """The [train] extra, or one line saying how to install it (before anything imports it)."""
    missing = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise RigplanError(f"{command} needs {', '.join(missing)}, not installed here; install the training "
                           "extra: pip install -e \".[train]\" (\".[gpu]\" on a CUDA machine)")


def _offline() -> bool:
    # huggingface_hub's own switches (https://huggingface.co/docs/huggingface_hub/package_reference/environment_variables)
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def require_weights(path: str) -> None:
    """Fail in a second, not after a minute of retries, when the weights are neither on this machine (a
    directory, or the hub cache) nor reachable on the hub; nothing is downloaded here."""
    if model_source(path)[1]:
        return
    if path.startswith(("/", ".", "~")):
        raise RigplanError(f"model directory {path} does not exist; pass a local model directory or a hub id")
    import httpx
    import huggingface_hub as hub
    from huggingface_hub import errors

    try:
        if isinstance(hub.try_to_load_from_cache(path, "config.json"), str):
            return
        if _offline():
            raise RigplanError(f"cannot download {path}: offline (HF_HUB_OFFLINE) and not in the hub cache; "
                               "pass a local directory, or unset HF_HUB_OFFLINE")
        hub.model_info(path, timeout=HUB_TIMEOUT_S)
    except errors.RepositoryNotFoundError as e:
        raise RigplanError(f"{path} is not on the Hugging Face hub (or is private); pass a local directory or "
                           "an existing hub id (hf auth login for private ones)") from e
    except (OSError, httpx.HTTPError, errors.HfHubHTTPError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RigplanError(f"cannot download {path} ({reason}); pass a local directory or check your network") from e


def import_engine(engine: str) -> None:
    """Import Unsloth first when it is the engine: it patches transformers, peft and trl on import, and warns
    that it 'should be imported before' them when they came first."""
    if engine != "unsloth":
        return
    if importlib.util.find_spec("unsloth") is None:
        raise RigplanError("this plan's engine is unsloth, which is not installed: pip install -e \".[gpu]\" "
                           "(CUDA GPUs), or pass --engine transformers")
    import unsloth  # noqa: F401


def import_first() -> None:
    """Before anything imports transformers on a machine that will train with Unsloth (counting tokens for the
    plan comes first): import Unsloth where it is installed and CUDA is present."""
    if importlib.util.find_spec("unsloth") is None:
        return
    import torch

    if torch.cuda.is_available():
        import unsloth  # noqa: F401


def model_source(path: str) -> tuple[str, bool]:
    """Where weights and tokenizer load from: an existing local directory (user-expanded), loaded offline,
    or else a hub id as given. Every loader (engines, tokenizer, merge) goes through this."""
    local = Path(path).expanduser()
    return (str(local), True) if local.is_dir() else (path, False)


def float16_refusal(path: str, local: bool, method: str, bf16: bool) -> str | None:
    """What Unsloth 2026.10.9 refuses on a GPU without bf16, said before the tokenizer, data and weights load (run.py
    train): gpt-oss QLoRA from a checkpoint storing its experts fused, which it will not quantize in float16
    (unsloth/models/loader_utils.py refuse_gpt_oss_fused_4bit_float16; gpt_oss_checkpoint_has_fused_experts: one
    without a quantization_config).
    Recorded when a probe so loaded a local gpt-oss replica: bench/results/h200-no-bf16/failed-gptoss.txt. A hub id
    it maps itself for 4-bit loads (openai/gpt-oss-20b to unsloth/gpt-oss-20b-unsloth-bnb-4bit) is not refused."""
    config_file = Path(path) / "config.json"
    if bf16 or method != "qlora" or not local or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "gpt_oss" or config.get("quantization_config"):
        return None
    return (f"{path} stores gpt-oss's experts fused, which Unsloth will not train as QLoRA on a GPU without bf16 "
            "(its 4-bit experts would overflow float16); load unsloth/gpt-oss-20b-unsloth-bnb-4bit (or -120b), "
            "or train on a GPU with bf16")


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


# Model types transformers 5.17 gives no SDPA attention (models/gpt_oss/modeling_gpt_oss.py: attention sinks).
EAGER_ATTENTION = ("gpt_oss",)


def load_hf_peft(plan: Plan) -> tuple[Any, Any]:
    """Plain transformers + PEFT (bitsandbytes NF4 for QLoRA): the baseline, and the CPU path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    sharded = plan.parallelism == "fsdp"
    path, local = model_source(plan.model_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local}
    if plan.method == "qlora":
        if not cuda:
            raise RigplanError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); pass --method lora on this machine")
        from transformers import BitsAndBytesConfig

        # Sharded (FSDP): the 4-bit weights stored as bf16 elements, so that FSDP shards them like the bf16 ones
        # (PEFT's FSDP + QLoRA guide, https://huggingface.co/docs/peft/accelerate/fsdp, bnb_4bit_quant_storage).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16 if sharded else torch.uint8)
    if cuda:
        from transformers import AutoConfig

        from rigplan.trainer.distributed import world

        torch.cuda.set_device(world().local_rank)
        config = AutoConfig.from_pretrained(path, local_files_only=local)
        # Each process its own GPU (torchrun's LOCAL_RANK). Sharded 16-bit weights are placed by FSDP from rank 0's
        # copy (no device_map); 4-bit ones are quantized on each GPU first (estimator/memory.py quantized_load_bytes),
        # unless the checkpoint is 4-bit already: then each process loads it into CPU memory and FSDP2 moves its
        # shards (plan.load_on_cpu, estimator/memory.py loads_on_cpu; its storage checked by trainer/run.py train()
        # before the data, require_float_storage).
        if plan.load_on_cpu:
            kwargs["device_map"] = {"": "cpu"}
        elif not sharded or plan.method == "qlora":
            kwargs["device_map"] = {"": world().local_rank}
        # SDPA where the model has it; gpt-oss's attention sinks have no SDPA kernel in transformers 5.17 (it
        # raises ValueError for "sdpa"), so it keeps its own eager attention.
        kwargs["attn_implementation"] = "eager" if config.model_type in EAGER_ATTENTION else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    if plan.checkpointing == "unsloth" and not sharded:  # sharded: FSDP's own (trainer/run.py fsdp_arguments)
        # PEFT's own checkpointing: non-reentrant, inputs made to require grad so the frozen base backprops.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(plan.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def require_float_storage(config: Any, path: str) -> None:
    """FSDP2 shards only floating-point tensors: a 4-bit checkpoint stored as uint8 (bitsandbytes' default, as
    Unsloth's `-bnb-4bit` copies are) must be viewed as bf16 first, which Unsloth's FSDP2 hook does on import
    (unsloth/models/fsdp2_qlora.py `params4bit_to_float_storage`, Unsloth 2026.10.9); without Unsloth installed,
    refused before the weights load."""
    quant = getattr(config, "quantization_config", None) or {}
    storage = (quant if isinstance(quant, dict) else vars(quant)).get("bnb_4bit_quant_storage", "uint8")
    if str(storage).removeprefix("torch.") != "uint8":
        return
    if importlib.util.find_spec("unsloth") is not None:
        import unsloth  # noqa: F401  (installs the hook where `rigplan run` had not imported it yet)

        return
    raise RigplanError(f"{path} stores its 4-bit weights as uint8, which FSDP cannot shard without Unsloth's "
                       "FSDP2 hook: pip install -e \".[gpu]\", or save the checkpoint with "
                       "bnb_4bit_quant_storage=bfloat16")


def load(plan: Plan) -> tuple[Any, Any]:
    """The plan's engine, loaded (its choice is planning's: rigplan/planning.py choose_engine)."""
    import_engine(plan.engine)
    return load_unsloth(plan) if plan.engine == "unsloth" else load_hf_peft(plan)


def count_tokens(model_path: str, data_file: Path, skip_bad: bool = False) -> tuple[list[int], int] | None:
    """The data's tokens per example (a sample of up to 2,000) counted with the model's tokenizer when it is on
    this machine (a local model directory or the hub cache; nothing is downloaded), and the number of
    examples; else None: the plan then estimates lengths from characters. Bad records stop either way,
    line-numbered, unless skip_bad."""
    from rigplan import data

    data.estimated_lengths(Path(data_file), skip_bad)  # every data problem, before any tokenizer loads
    import_first()
    try:
        from transformers import AutoTokenizer

        source, _ = model_source(model_path)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (ImportError, OSError, ValueError):  # not on disk: estimate instead
        return None
    return data.token_lengths(Path(data_file), tokenizer, skip_bad=skip_bad)


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
