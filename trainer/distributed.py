"""Several GPUs on torch.distributed: who this process is, and how `rigplan run` relaunches itself under torchrun.

A plan for N GPUs trains in N processes, one per GPU, as torchrun (or `accelerate launch`, or a cluster launcher
that sets the same variables) starts them: transformers' Trainer then wraps the model in DDP and shards the
data by rank (https://huggingface.co/docs/transformers/main/en/perf_train_gpu_many). Only rank 0 writes files
and prints. Standard library only: the CLI asks before anything heavy loads.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import NoReturn

# The variables torchrun sets in every process it starts (https://pytorch.org/docs/stable/elastic/run.html).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# NVLink multicast (NVLS) off in every process: NCCL's multicast setup failed on the machines we measured two
# GPUs on (the device tool's KINDS.md); plain NVLink rings are what the plans assume.
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs and prints."""
        return self.rank == 0


def world() -> World:
    """From the launcher's environment; one process (rank 0 of 1) when none started this one."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch, a cluster's) started this process."""
    return all(v in os.environ for v in LAUNCHER_VARS)


def check_gpu_count(num_gpus: int, cpu: bool) -> None:
    """A plan for more GPUs than this host has is refused (several hosts start torchrun themselves, which sets
    the launcher's variables); CPU processes (gloo) need no GPU."""
    if cpu or num_gpus == 1 or launched():
        return
    from rigplan.errors import ConfigError
    from rigplan.profiles import nvml

    found, why = nvml.local_gpus()
    if len(found) < num_gpus:
        raise ConfigError(f"this plan trains on {num_gpus} GPUs but this machine has {len(found)}"
                          + (f" ({why})" if not found else "") + f"; pass --gpus {max(1, len(found))}, or start "
                          "torchrun on each host yourself (docs/training.md)")


def relaunch_command(num_gpus: int, argv: list[str]) -> list[str]:
    """torchrun starting `python -m rigplan` with the same arguments once per GPU on this host. Several hosts:
    run that same command on each, with --nnodes, an --rdzv-id and a --rdzv-endpoint they all reach (torchrun's
    c10d rendezvous), as docs/training.md shows."""
    torchrun = shutil.which("torchrun")
    head = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", f"--nproc-per-node={num_gpus}", "-m", "rigplan", *argv]


# Set in the processes `rigplan run` relaunches under torchrun: the launching process has already shown the plan.
RELAUNCHED_VAR = "RIGPLAN_RELAUNCHED"


def launch_env(processes: int = 1) -> dict[str, str]:
    """The environment the relaunched processes get: ours, with NCCL_DEFAULTS and OMP_NUM_THREADS where unset, and
    RELAUNCHED_VAR. OMP_NUM_THREADS splits this host's cores between the processes: torchrun otherwise sets 1 in
    each (its warning asks to tune it), leaving each process's CPU work (collating micro-batches, an offloaded
    optimizer's step and gradient clipping) one thread, where one process alone has every core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = {"OMP_NUM_THREADS": str(max(1, cores // max(1, processes)))}
    return {**NCCL_DEFAULTS, **threads, **os.environ, RELAUNCHED_VAR: "1"}


def relaunched() -> bool:
    """Whether `rigplan run` itself started this process (not a launcher the user ran)."""
    return os.environ.get(RELAUNCHED_VAR) == "1"


# Objects that hold the process group (the Trainer, through its DDP- or FSDP-wrapped model), kept until exit_now.
_HELD: list[object] = []


def hold(obj: object) -> None:
    """Keep obj, which holds the process group, alive until the process ends (exit_now): see there why."""
    _HELD.append(obj)


def exit_now(code: int) -> NoReturn:
    """A process of a several-GPU run ends here, its outputs written: streams flushed, then os._exit, without
    tearing down torch's objects. Freed by the interpreter (when train() returned and the Trainer went, DDP's
    reducer with it), gloo's process group joins its worker thread while holding the GIL, and that thread may
    still be dropping a finished collective whose tensors need the GIL: a CPU process hung there after writing
    every output (py-spy: ~ProcessGroupGloo in std::thread::join, the worker in decref_pyobject; CI's test run
    timed out on it), and at interpreter exit gloo's threads aborted a process now and then. Runs that offload to
    the CPU carry gloo on GPUs too (trainer/run.py process_backend)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave() -> None:
    """Every process leaves torch.distributed together after the run's last collective, as PyTorch asks
    (https://pytorch.org/docs/stable/distributed.html#shutdown): a barrier first, so that no process is still in a
    collective when another tears the group down (without it gloo deadlocked at exit), then destroy_process_group
    (without it NCCL warned of leaked resources after every two-GPU run, and gloo's worker threads can abort the
    interpreter's exit). Nothing to do for one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if "nccl" in str(dist.get_backend()):  # "nccl", or "cuda:nccl,cpu:gloo" (run.py process_backend)
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()
