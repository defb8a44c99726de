"""Run by tests/test_fsdp.py under torchrun (two CPU processes, gloo): a toy PEFT model sharded with FSDP2 as
accelerate shards it (fully_shard on each decoder layer, then the root), the adapter gathered whole by
trainer/export.py full_adapter_state on every rank, the group left (trainer/distributed.py leave), then written by
rank 0 and compared with the unsharded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from rigplan.trainer.distributed import exit_now, leave
from rigplan.trainer.export import full_adapter_state


def lora(model_dir: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, config)


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    whole = {k: v.detach().clone() for k, v in lora(model_dir).named_parameters() if v.requires_grad}
    model = lora(model_dir)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    state = full_adapter_state(model)
    rank = dist.get_rank()
    leave()  # as trainer/run.py: the group is gone before rank 0 writes the adapter of the sharded model
    if rank == 0:
        same = sorted(state) == sorted(whole) and all(torch.equal(state[k], whole[k]) for k in whole)
        model.save_pretrained(out / "adapter", state_dict=state)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, str(out / "adapter"))
        reloaded = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
        back = sorted(reloaded) == sorted(whole) and all(torch.equal(reloaded[k], whole[k]) for k in whole)
        extra = sorted(set(state) ^ set(whole))
        (out / "result.json").write_text(json.dumps({"sharded": sharded, "same": same, "reloaded": back, "extra": extra,
                                                     "tensors": len(state)}))
    # Out without tearing down the process group, as `rigplan run` ends (a rank aborted at exit now and then in CI's
    # clone: "terminate called without an active exception").
    exit_now(0)


if __name__ == "__main__":
    main()
