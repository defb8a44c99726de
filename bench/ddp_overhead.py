"""Where a DDP step's extra time goes (issue 16): the same fixed-shape Unsloth LoRA step timed alone and under
torch DDP in several settings, in one load of the model per process.

    CUDA_VISIBLE_DEVICES=0 python3 bench/ddp_overhead.py --model-dir DIR --out one.jsonl       # one GPU alone
    torchrun --standalone --nproc-per-node 2 bench/ddp_overhead.py --model-dir DIR --out two   # two GPUs

Variants, in this order (each: WARMUP steps, then STEPS steps timed as one block, the GPU synchronised only at
the block's edges, as a training loop runs; micro-batch x seq random ids; 8-bit AdamW; gradients clipped at 1.0
as transformers' Trainer clips them):
- alone: no DDP, no collective (several processes: every GPU busy at once, none waiting for another);
- alone_accum2: two micro-batches of half the size per step;
- ddp: DistributedDataParallel as transformers' Trainer wraps it (find_unused_parameters False, 25 MB buckets,
  buffers broadcast before every forward);
- ddp_no_buffers: the same, buffers not broadcast;
- ddp_one_bucket: every adapter gradient in one bucket (one all-reduce after the backward pass, nothing spinning
  on the GPU's multiprocessors during it), buffers not broadcast;
- ddp_token_gather: ddp_one_bucket, with the all-reduce of the step's token count before the forward pass that
  transformers' Trainer makes (average_tokens_across_devices);
- ddp_accum2: ddp, two half micro-batches per step, the first under no_sync.
One JSON line per variant (per process), with provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from pathlib import Path

WARMUP, STEPS = 3, 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="a full-depth replica (calibration/replica.py)")
    ap.add_argument("--method", default="lora", choices=("lora", "qlora"))
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1280)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", required=True, help="a .jsonl file (one process) or a prefix (several)")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from rigplan.estimator.plan import Plan
    from rigplan.trainer.distributed import world
    from rigplan.trainer.engine import load, provenance

    me = world()
    torch.cuda.set_device(me.local_rank)
    several = me.world_size > 1
    if several:
        dist.init_process_group("nccl", device_id=torch.device("cuda", me.local_rank))
    plan = Plan(model="llama-3.1-8b", model_path=args.model_dir, gpu="h200", method=args.method, rank=args.rank,
                micro_batch=args.micro_batch, grad_accum=1, seq_len=args.seq, checkpointing="off", engine="unsloth")
    model, _tok = load(plan)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    vocab = model.config.vocab_size
    device = torch.device("cuda", me.local_rank)
    out = Path(args.out if not several else f"{args.out}-rank{me.rank}.jsonl")
    prov = provenance()

    def step(net, accum: int, gather: bool) -> None:
        b = args.micro_batch // accum
        for k in range(accum):
            ids = torch.randint(0, vocab, (b, args.seq), device=device)
            if gather:
                n = torch.tensor(b * args.seq, device=device)
                dist.all_reduce(n)
            sync = net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) and k < accum - 1 \
                else contextlib.nullcontext()
            with sync:
                loss = net(input_ids=ids, labels=ids).loss / accum
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(name: str, net, accum: int = 1, gather: bool = False) -> None:
        for _ in range(WARMUP):
            step(net, accum, gather)
        torch.cuda.synchronize()
        if several:
            dist.barrier()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(STEPS):
            step(net, accum, gather)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / STEPS
        row = {"variant": name, "rank": me.rank, "world_size": me.world_size, "method": args.method,
               "micro_batch": args.micro_batch, "seq": args.seq, "accum": accum, "step_s": round(s, 4),
               "tokens_per_s_per_gpu": round(args.micro_batch * args.seq / s, 1),
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3), "provenance": prov}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)

    timed("alone", model)
    timed("alone_accum2", model, accum=2)
    if several:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, kw, accum, gather in (
                ("ddp", {}, 1, False),
                ("ddp_no_buffers", {"broadcast_buffers": False}, 1, False),
                ("ddp_one_bucket", {"broadcast_buffers": False, "bucket_cap_mb": 4096}, 1, False),
                ("ddp_token_gather", {"broadcast_buffers": False, "bucket_cap_mb": 4096}, 1, True),
                ("ddp_accum2", {}, 2, False)):
            net = DDP(model, device_ids=[me.local_rank], find_unused_parameters=False, **kw)
            timed(name, net, accum, gather)
            del net
            gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
