"""Several processes: `rigplan run --gpus 2` relaunches itself under torchrun, two processes on the CPU with gloo
(as on two GPUs with NCCL), a toy model from profile facts. Rank 0 alone writes; a signal to one rank stops both
at the same step with a checkpoint; --resume finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from rigplan.profiles.catalog import resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toy_llama_and_data) -> tuple[Path, Path]:
    return toy_llama_and_data(tmp_path_factory.mktemp("ddp"), 64)


def _run(args: list[str], extra_env: dict[str, str] | None = None, stderr: int = subprocess.STDOUT,
         **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "rigplan", "run", *args], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env, start_new_session=True, **kw)


def _ranks() -> list[int]:
    """The pids of the processes torchrun started (their command line runs the written plan.json), oldest first."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"rigplan" in cmd and any(c.endswith(b"plan.json") for c in cmd):
            found.append(int(proc.name))
    return sorted(found)


def test_two_processes_train_and_rank_0_alone_writes(setup, tmp_path) -> None:
    model, data = setup
    out = tmp_path / "o"
    proc = _run([str(model), "--data", str(data), "--gpus", "2", "--out", str(out), "--max-steps", "6",
                 "--seq", "64"])
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "launching 2 processes" in log and log.count("done after 6 steps") == 1  # rank 1 prints nothing
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "done" and summary["global_step"] == 6
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    steps = [r["step"] for r in logged]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step logged once, by rank 0
    # the logged tokens/s is both processes' (the run's, as the plan's), not process 0's alone (half of it)
    m = summary["measured"]  # tokens: summed over the processes; step_seconds: process 0's, from training's start
    assert 0.8 < logged[-1]["tokens_per_s"] / (m["tokens"] / sum(m["step_seconds"])) < 1.25
    assert m["cpu_peak_rss_gib"] > 0.4  # both processes' peak resident memory together (torch: some 0.3 GiB each)
    assert 0 < m["cpu_peak_anon_gib"] < m["cpu_peak_rss_gib"]  # summed too
    assert json.loads((out / "plan.json").read_text())["num_gpus"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert summary["ranks_agree"] is True
    # the automatic garbage collector paused while training: no process collects where the other does not
    assert summary["measured"]["gc"] == {**summary["measured"]["gc"], "aligned": True, "collections": 0}


def test_accumulated_micro_batches_are_all_reduced(setup, tmp_path) -> None:
    """Two micro-batches per step on each of two processes: every one's gradient reaches the all-reduce, so both
    processes end with the same adapter (DDP all-reduces each parameter's whole .grad at the step's last backward)."""
    model, data = setup
    out = tmp_path / "o"
    proc = _run([str(model), "--data", str(data), "--gpus", "2", "--out", str(out), "--max-steps", "4",
                 "--seq", "64", "--micro-batch", "2", "--grad-accum", "2", "--json"], stderr=subprocess.PIPE)
    stdout, log = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert json.loads(stdout) == summary  # --json: process 0's summary alone on stdout, the rest on stderr
    assert log.count("done after 4 steps") == 1 and log.count("plan: ") == 1  # the launcher's, once
    assert json.loads((out / "plan.json").read_text())["grad_accum"] == 2
    assert summary["global_step"] == 4 and summary["ranks_agree"] is True


def test_the_loss_is_one_gpus_loss_on_the_same_tokens(setup, tmp_path) -> None:
    """Each process's loss is normalised by every process's tokens, and DDP averages the gradients: the trainer
    multiplies by the number of processes, as transformers' own compute_loss does. Without it the two-process run
    logged (and stepped) half the loss of one process on the same untrained model."""
    model, data = setup
    losses = []
    for gpus in (1, 2):
        out = tmp_path / f"o{gpus}"
        proc = _run([str(model), "--data", str(data), "--gpus", str(gpus), "--out", str(out), "--max-steps", "1",
                     "--seq", "64", "--micro-batch", "4", "--grad-accum", "1"])
        log = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, log[-3000:]
        losses.append(json.loads((out / "run_summary.json").read_text())["first_loss"])
    assert 0.85 < losses[1] / losses[0] < 1.15, losses


# Started in every process of the run below (Python imports sitecustomize at start-up from PYTHONPATH): process 1's
# model raises CUDA's out-of-memory error on any micro-batch of more than two examples, as a smaller GPU would.
ONE_SMALL_GPU = """
import os

if os.environ.get("RANK") == "1":
    from rigplan.trainer import engine

    real_load = engine.load

    def load(plan):
        model, tokenizer = real_load(plan)
        inner = model.forward

        def forward(*args, **kwargs):
            if kwargs["input_ids"].shape[0] > 2:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory (process 1's GPU, simulated)")
            return inner(*args, **kwargs)

        model.forward = forward
        return model, tokenizer

    engine.load = load
"""


def test_out_of_memory_in_one_process_is_backed_off_by_every_process(setup, tmp_path) -> None:
    """Process 1 alone runs out of memory on micro-batches of four: it splits them in two and goes on, with no
    collective left waiting in the other; every process takes the split a few steps later (said once, by process 0);
    the run ends with both adapters equal and the loss of the same run that never ran out."""
    from rigplan.trainer.loop import STOP_LAG_STEPS

    model, data = setup
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ONE_SMALL_GPU)
    args = [str(model), "--data", str(data), "--gpus", "2", "--max-steps", "6", "--seq", "64", "--micro-batch", "4",
            "--grad-accum", "2"]
    runs = {}
    small = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    for name, env in (("plain", {}), ("tight", small)):
        proc = _run([*args, "--out", str(tmp_path / name)], extra_env=env)
        log = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, log[-3000:]
        runs[name] = (json.loads((tmp_path / name / "run_summary.json").read_text()), log)
    (plain, _), (tight, log) = runs["plain"], runs["tight"]
    assert plain["oom_backoffs"] == [] and tight["status"] == "done" and tight["global_step"] == 6
    # process 0 never ran out itself: it took process 1's split at the step where the shared flag was read, and
    # says where and when process 1 ran out
    assert tight["oom_backoffs"] == [{"step": 1 + STOP_LAG_STEPS, "micro_batch": 2, "elsewhere": True, "process": 1,
                                      "process_step": 0}]
    assert log.count(f"CUDA out of memory on process 1 in step 1: micro-batch now 2 on every process after step "
                     f"{1 + STOP_LAG_STEPS}") == 1
    events = [json.loads(x) for x in (tmp_path / "tight" / "metrics.jsonl").read_text().splitlines()]
    assert [e["micro_batch"] for e in events if e.get("event") == "oom_backoff"] == [2]
    assert tight["ranks_agree"] is True
    assert tight["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-3)


def test_a_signal_to_one_rank_stops_both_and_resume_finishes(setup, tmp_path) -> None:
    model, data = setup
    out = tmp_path / "o"
    args = [str(model), "--data", str(data), "--gpus", "2", "--out", str(out), "--max-steps", "200", "--seq", "64",
            "--save-steps", "1000"]
    proc = _run(args)
    deadline = time.time() + 180
    workers: list[int] = []
    while time.time() < deadline:  # once training has begun, signal rank 1 alone
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            workers = _ranks()
            if len(workers) >= 2:
                break
        time.sleep(0.2)
    assert len(workers) >= 2, "the two ranks never started training"
    os.kill(workers[-1], signal.SIGINT)
    proc.communicate(timeout=120)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["global_step"] < 200
    stopped = summary["global_step"]
    assert (out / "checkpoints" / f"checkpoint-{stopped}").is_dir()  # both ranks stopped at that step and saved
    resumed = _run([*args[:-2], "--save-steps", "1000", "--resume", "--max-steps", str(stopped + 4)])
    log = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, log[-3000:]
    again = json.loads((out / "run_summary.json").read_text())
    assert again["status"] == "done" and again["global_step"] == stopped + 4


def test_started_under_torchrun_the_plan_is_for_its_processes(setup, tmp_path) -> None:
    """`torchrun --nproc-per-node 2 -m rigplan run MODEL` without --gpus: the plan is made for the two processes
    the launcher started (DDP over 2), not for one GPU trained twice."""
    model, data = setup
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "rigplan", "run", str(model), "--data", str(data), "--out", str(out), "--max-steps", "3",
                        "--seq", "64"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["num_gpus"], summary["world_size"], summary["parallelism"]) == (2, 2, "ddp")
    assert summary["ranks_agree"] is True


def test_two_hosts_through_torchruns_rendezvous(setup, tmp_path) -> None:
    """The several-host command docs/training.md gives, with two "hosts" on this machine: the same torchrun
    command on each (--nnodes 2, one --rdzv-id, one c10d --rdzv-endpoint), one process each. They meet, train DDP
    over both, end with the same adapter, and only global rank 0 (whichever process the rendezvous makes it)
    prints."""
    import socket

    model, data = setup
    out = tmp_path / "o"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-id",
               "rigplan-test", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "rigplan", "run",
               str(model), "--data", str(data), "--out", str(out), "--max-steps", "3", "--seq", "64"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert sum("done after 3 steps" in log for log in logs) == 1 and sum("done after" in log for log in logs) == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["world_size"], summary["parallelism"], summary["ranks_agree"]) == (2, "ddp", True)


def test_an_fsdp_plan_on_cpu_processes_is_refused_before_anything_loads(setup, tmp_path) -> None:
    """accelerate shards a model over GPU processes only (CPU ones would silently train DDP): one line, exit 2,
    nothing written. The sharded path's own pieces are tested in tests/test_fsdp.py."""
    import dataclasses

    from click.testing import CliRunner

    from rigplan import planning
    from rigplan.cli import main

    model, data = setup
    plan = dataclasses.replace(planning.make_plan(str(model), None, data_file=data, allow_cpu=True),
                               parallelism="fsdp", num_gpus=2)
    f = tmp_path / "plan.json"
    f.write_text(plan.to_json())
    r = CliRunner().invoke(main, ["run", str(f), "--data", str(data), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "FSDP" in r.output and not (tmp_path / "o").exists()


def test_a_plan_for_more_gpus_than_the_host_has_is_refused(monkeypatch) -> None:
    from rigplan.errors import ConfigError
    from rigplan.profiles import nvml
    from rigplan.trainer import distributed

    monkeypatch.setattr(nvml, "local_gpus", lambda: ([], "no NVIDIA driver"))
    with pytest.raises(ConfigError, match="has 0"):
        distributed.check_gpu_count(2, cpu=False)
    distributed.check_gpu_count(2, cpu=True)  # CPU processes: gloo, no GPU needed
    distributed.check_gpu_count(1, cpu=False)


def test_garbage_collection_is_paused_and_aligned_for_several_processes() -> None:
    """GcWatch (trainer/loop.py): with several processes the automatic collector is off while training and a
    collection runs only when called (at the same optimizer step in every process), and is recorded; afterwards
    the collector is back on. One process keeps the automatic collector, its collections recorded too."""
    import gc

    from rigplan.trainer.loop import GcWatch

    watch = GcWatch()
    watch.start(manual=True)
    try:
        assert not gc.isenabled()
        junk = [[] for _ in range(10_000)]
        for a, b in zip(junk, junk[1:]):
            a.append(b), b.append(a)  # cycles only the collector frees
        del junk, a, b
        assert watch.summary()["collections"] == 0
        watch.collect()
        s = watch.summary()
        assert s["collections"] == 1 and s["full"] == 1 and s["aligned"] and s["total_s"] > 0
    finally:
        watch.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    single = GcWatch()
    single.start(manual=False)
    try:
        assert gc.isenabled() and not single.summary()["aligned"]
    finally:
        single.stop()


def test_a_process_leaves_the_group_after_a_barrier(tmp_path) -> None:
    """The end of every run: torch.distributed's group is destroyed (PyTorch's shutdown advice; NCCL warned of
    leaked resources without it), and leaving without a group is nothing."""
    import torch.distributed as dist

    from rigplan.trainer.distributed import leave

    leave()  # one process, no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    leave()
    assert not dist.is_initialized()


def test_ddp_with_gradient_checkpointing_trains_as_without(setup, tmp_path) -> None:
    """DDP with checkpointing (the planner offers it since two H200s trained it under Unsloth: bench/results/
    h200-runs/ddp/checkpointing-4090x2/): the recomputing backward meets no DDP hook, every micro-batch running
    under no_sync, so the run trains what the run without checkpointing trains, the ranks' adapters equal."""
    model, data = setup
    runs = {}
    for ckpt in ("off", "unsloth"):
        proc = _run([str(model), "--data", str(data), "--gpus", "2", "--parallelism", "ddp", "--max-steps", "4",
                     "--seq", "64", "--checkpointing", ckpt, "--out", str(tmp_path / ckpt)])
        log = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, log[-3000:]
        runs[ckpt] = json.loads((tmp_path / ckpt / "run_summary.json").read_text())
        assert json.loads((tmp_path / ckpt / "plan.json").read_text())["checkpointing"] == ckpt
    off, on = runs["off"], runs["unsloth"]
    assert on["status"] == "done" and on["global_step"] == 4 and on["ranks_agree"] is True
    assert on["final_loss"] == pytest.approx(off["final_loss"], rel=1e-4)


def test_the_relaunched_processes_share_the_hosts_cores_and_keep_nvlink_multicast_off(monkeypatch) -> None:
    """`rigplan run --gpus N` starts torchrun with OMP_NUM_THREADS set to this host's cores over N (torchrun would
    set 1 in each) and NCCL's NVLink multicast off, unless the user set them; its processes know they were
    relaunched."""
    from rigplan.trainer import distributed

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    env = distributed.launch_env(2)
    assert env["OMP_NUM_THREADS"] == "16" and env["NCCL_NVLS_ENABLE"] == "0" and env[distributed.RELAUNCHED_VAR] == "1"
    assert distributed.launch_env(64)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.launch_env(2)["OMP_NUM_THREADS"] == "3"
