"""What rigplan adds to TRL's training loop: a callback that watches every step (signals shared by all ranks,
NaN, metrics.jsonl, real tokens, ETA), the out-of-memory backoff, and what a run measures (GPU memory sampled
through NVML while it trains). trainer/run.py puts them together; heavy imports stay inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rigplan.trainer.options import CHECKPOINT_COMPLETE

# Optimizer steps left out of the measured tokens/s: compile warm-up (15-40 s per new shape on the H100).
WARMUP_STEPS = 3
# Several processes: Python's cyclic garbage collector paused while training and run by every process at the same
# optimizer steps, this many apart. A collection that lands inside one process's step holds every other process at
# the next all-reduce: the straggler effect Megatron-LM's --manual-gc aligns across ranks
# (megatron/training/training.py, manual_gc_interval). On two H200s each step's time strayed from its length's
# by +46 ms at the 90th percentile and +95 ms at the 99th on one GPU; the slowest of two such processes then sets
# every step (bench/results/README.md, the seventh session). One process keeps the automatic collector.
GC_EVERY_STEPS = 50
# Several processes act on a signal this many optimizer steps after the step it was shared in (_Guard.stop_agreed).
STOP_LAG_STEPS = 2


class _Guard:
    """Signal flag, NaN watch, metrics log and token count, as one TrainerCallback (built lazily:
    transformers is heavy)."""

    def __init__(self, out_dir: Path, sync: Any = None, micro_batch: int = 1) -> None:
        self.out_dir = out_dir
        self.micro_batch = micro_batch  # the plan's
        self.split = 1  # micro-batches are cut into this many parts after out-of-memory errors
        self.split_step = -1  # the step at which this process last split its own (shared with the others)
        self.signal: int | None = None
        self.nan_step: int | None = None
        self.sync = sync  # torch.cuda.synchronize on CUDA: the clock is read when the GPU is done
        self.t0 = time.perf_counter()
        self.warmup, self.last_index = WARMUP_STEPS, -1  # set when training begins
        # Real (non-padding) tokens trained, on the device until read: an int, or a tensor once a padded
        # micro-batch has added its attention mask's sum (read on the host only when logging or at the end).
        self.tokens: Any = 0
        self.step_times: list[float] = []
        self.step_tokens: list[Any] = []
        # Micro-batch shapes run so far; a step that meets a new one compiles it (Unsloth's compiled decoder
        # blocks): from that micro-batch to the step's end, (step index, seconds, tokens before it).
        self.shapes: set[tuple[int, ...]] = set()
        self.new_shape_from: tuple[float, Any] | None = None
        self.compiling: list[tuple[int, float, Any]] = []
        self.backoffs: list[dict[str, int]] = []
        self.pending: list[tuple[Any, Any]] = []  # several processes: each step's all-reduced signal, and its wait
        self.gc = GcWatch()
        from rigplan.trainer.distributed import world

        self.world = world()
        self.main = self.world.main  # rank 0 alone writes files

    def meet(self, inputs: dict[str, Any]) -> None:
        """Before a padded micro-batch runs: if its shape is new, the clock is read with the GPU done so far, so
        that the compiling it starts is timed apart from the steps before it. Padding-free rows (no attention
        mask) differ in length every time and run uncompiled: not tracked."""
        shape = tuple(inputs["input_ids"].shape)
        if "attention_mask" not in inputs or shape in self.shapes:
            return
        self.shapes.add(shape)
        if self.new_shape_from is None:
            if self.sync is not None:
                self.sync()
            self.new_shape_from = (time.perf_counter(), self.tokens)

    def count(self, inputs: dict[str, Any]) -> None:
        """Add a micro-batch's real tokens: its attention mask's sum when padded; all of its one row when
        padding-free (TRL's collator then sends no mask and no padding)."""
        mask = inputs.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())

    def note_backoff(self, step: int, micro_batch: int, elsewhere: tuple[int, int] | None = None) -> None:
        """An out-of-memory error made the trainer split micro-batches: in this process, or elsewhere (process,
        step) in another one, whose split every process takes from here on. Logged to metrics.jsonl and stderr.
        step: optimizer steps done (the records' convention); printed as the step in progress, as the progress
        lines count them (the first is step 1)."""
        backoff: dict[str, Any] = {"step": step, "micro_batch": micro_batch}
        if elsewhere is not None:
            self.split_step = -1
            backoff.update(elsewhere=True, process=elsewhere[0], process_step=elsewhere[1])
        else:
            self.split_step = step
        self.backoffs.append(backoff)
        if not self.main:
            return
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({**backoff, "event": "oom_backoff"}) + "\n")
        if elsewhere is not None:
            print(f"rigplan: CUDA out of memory on process {elsewhere[0]} in step {elsewhere[1] + 1}: micro-batch now "
                  f"{micro_batch} on every process after step {step}, accumulation doubled", file=sys.stderr,
                  flush=True)
            return
        every = " on every process" if self.world.world_size > 1 else ""
        print(f"rigplan: CUDA out of memory in step {step + 1}: micro-batch now {micro_batch}{every}, accumulation "
              "doubled", file=sys.stderr, flush=True)

    def tokens_so_far(self) -> float:
        """Real tokens trained so far, every process's together: the logs' and progress lines' tokens/s is the
        run's, as the plan's is. Several processes sum theirs in an all-reduce, which every process reaches at the
        same log (the Trainer logs the loss, gathered from every process, at the same steps everywhere)."""
        if self.world.world_size == 1:
            return float(self.tokens)
        import torch
        import torch.distributed as dist

        if torch.is_tensor(self.tokens):  # a padded micro-batch's mask sum, still on the device: reduced there
            total = self.tokens.to(torch.float64, copy=True)
        else:
            total = torch.full((), float(self.tokens), dtype=torch.float64,
                               device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(total)
        return float(total)

    def steady_tokens_per_s(self) -> float | None:
        """Real tokens/s after the warm-up steps (Unsloth compiles each decoder block in the first ones)."""
        w, n = self.warmup, len(self.step_times)
        if n - w < 2:
            return None
        tokens = float(self.step_tokens[-1]) - float(self.step_tokens[w])
        return round(tokens / (self.step_times[-1] - self.step_times[w]), 1)

    def compiled_tokens_per_s(self) -> float | None:
        """Real tokens/s after the warm-up steps, leaving out each step from the first micro-batch of a shape not
        run before to its end (compiling): the rate of shapes already compiled, which a fixed-shape loop's
        steady rate (bench/train_throughput.py, calibration/probe.py: first step left out) compares with."""
        w, n = self.warmup, len(self.step_times)
        if n - w < 2:
            return None
        seconds = self.step_times[-1] - self.step_times[w]
        tokens = float(self.step_tokens[-1]) - float(self.step_tokens[w])
        for i, spent, before in self.compiling:
            if i > w:
                seconds -= spent
                tokens -= float(self.step_tokens[i]) - float(before)
        return round(tokens / seconds, 1) if seconds > 0 and tokens > 0 else None

    def step_seconds(self) -> list[float]:
        """Seconds each optimizer step took, from training's start."""
        times = [self.t0, *self.step_times]
        return [round(b - a, 3) for a, b in zip(times, times[1:])]

    def eta_s(self, steps_left: int) -> float | None:
        """Seconds left at this run's own pace since the warm-up steps (the first ones compile; the plan's
        predicted speed is not used: host-bound speeds differ between machines)."""
        w, n = self.warmup, len(self.step_times)
        if n - w < 2:
            return None
        return steps_left * (self.step_times[-1] - self.step_times[w]) / (n - 1 - w)

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum  # acted on at the end of the current step: save, then stop

    def stop_agreed(self, step: int = 0) -> bool:
        """Whether to save and stop after this step. Several processes stop together: each step every process adds
        the signal it got (torchrun forwards Ctrl-C to each, not at the same instant) to an all-reduce, and all
        act on that step's result STOP_LAG_STEPS steps later, the same step everywhere, so that all save the same
        checkpoint and none waits on a collective the others have left. Read at once, the result made each step
        wait for the GPU before the next could be queued; STOP_LAG_STEPS later it is long done (on CUDA it is
        copied to pinned memory behind the collective and read when that copy's event has passed). The same
        all-reduce shares the out-of-memory backoff: every process takes the largest split any has made, and
        learns which process made it at which step (the largest such, where two did at once)."""
        if self.world.world_size == 1:
            return self.signal is not None
        import torch
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        # torch.full and fill_, not torch.tensor: a list copied to the GPU is a blocking copy, which made the host wait
        # for the step's whole GPU work at every step's end (the next micro-batch then collated with the GPU idle).
        flag = torch.full((4,), self.signal or 0, dtype=torch.int64, device="cuda" if cuda else "cpu")
        flag[1].fill_(self.split)
        flag[2].fill_(self.world.rank if self.split_step >= 0 else -1)
        flag[3].fill_(self.split_step)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if cuda:
            work.wait()  # NCCL: the stream waits for the collective, the host does not
            host = torch.empty(4, dtype=torch.int64, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self.pending.append((host, ready.synchronize))
        else:
            self.pending.append((flag, work.wait))
        if len(self.pending) <= STOP_LAG_STEPS:
            return False
        value, wait = self.pending.pop(0)
        wait()
        agreed, split, process, process_step = (int(v) for v in value.tolist())
        if split > self.split:  # another process ran out of memory: its split, here too, from this step on
            self.split = split
            self.note_backoff(step, -(-self.micro_batch // split), elsewhere=(process, process_step))
        if agreed and self.signal is None:
            self.signal = agreed
        return bool(agreed)

    def drain(self) -> None:
        """Wait for the stop agreement's last all-reduces: a process that exits with one in flight aborts
        ("terminate called without an active exception", seen with gloo)."""
        while self.pending:
            self.pending.pop(0)[1]()

    def callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                guard.gc.start(manual=guard.world.world_size > 1)
                guard.t0 = time.perf_counter()
                steps = state.max_steps - state.global_step  # in this process (a resumed run starts later)
                guard.warmup, guard.last_index = min(WARMUP_STEPS, steps // 4), steps - 1
                return control

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                # The clock readings the steady and compiled rates are taken between wait for the GPU (the warm-up's
                # end, the last step, a step that met a new shape); the others are for progress only and stay
                # asynchronous.
                new_shape = guard.new_shape_from is not None
                if guard.sync is not None and (new_shape or len(guard.step_times) in (guard.warmup, guard.last_index)):
                    guard.sync()
                if guard.gc.manual and state.global_step % GC_EVERY_STEPS == 0:
                    guard.gc.collect()
                now = time.perf_counter()
                guard.step_times.append(now)
                guard.step_tokens.append(guard.tokens)
                if new_shape:
                    guard.compiling.append((len(guard.step_times) - 1, now - guard.new_shape_from[0],
                                            guard.new_shape_from[1]))
                    guard.new_shape_from = None
                if guard.stop_agreed(state.global_step):
                    control.should_save = True
                    control.should_training_stop = True
                return control

            def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
                guard.drain()
                return control

            def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
                # Called once transformers has written the whole checkpoint: mark it complete. Resume
                # uses only marked checkpoints, so one cut short by a crash is never resumed from.
                done = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_COMPLETE
                if guard.main and done.parent.is_dir():
                    done.write_text(json.dumps({"step": state.global_step}))
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                logs = logs if logs is not None else {}
                # The logged loss is the mean since the last log; NaN or inf in any of those steps makes it
                # NaN (logging_nan_inf_filter=False), and a log comes before every checkpoint (logging_steps).
                loss = logs.get("loss", logs.get("eval_loss"))
                if loss is not None and not math.isfinite(loss):
                    guard.nan_step = state.global_step
                    control.should_training_stop = True
                    control.should_save = False
                elapsed = time.perf_counter() - guard.t0
                if "loss" in logs:  # shown in the progress lines (this callback runs first)
                    logs["tokens_per_s"] = round(guard.tokens_so_far() / max(elapsed, 1e-9), 1)
                    eta = guard.eta_s(state.max_steps - state.global_step)
                    if eta is not None:
                        logs["eta_s"] = round(eta, 2)
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                if guard.main:
                    with (guard.out_dir / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(row) + "\n")
                return control

        return Callback()


def duration(seconds: float) -> str:
    """A time left as a person reads it: 45 s, 12 min 5 s, 3 h 20 min."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def progress_line(logs: dict[str, Any], step: int, max_steps: int) -> str | None:
    """One of the Trainer's logs as one line: the step, loss, gradient norm, learning rate, tokens/s and time left
    (the _Guard's, at the run's own pace), or an evaluation's loss; None for the Trainer's closing metrics, which
    `rigplan run`'s closing lines give beside the plan."""
    where = f"step {step:,}/{max_steps:,}"
    if "loss" in logs:
        parts = [where, f"loss {logs['loss']:.4f}"]
        if logs.get("grad_norm") is not None:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if logs.get("learning_rate") is not None:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if logs.get("tokens_per_s") is not None:
            parts.append(f"{logs['tokens_per_s']:,.0f} tok/s")
        if logs.get("eta_s") is not None:
            parts.append(f"ETA {duration(logs['eta_s'])}")
        return " | ".join(parts)
    if "eval_loss" in logs:
        return f"{where} | eval loss {logs['eval_loss']:.4f}"
    return None


def progress_callback() -> Any:
    """transformers' progress bar (tqdm, unless args.disable_tqdm), with each log written as progress_line instead of
    the logs' dict (transformers/trainer_callback.py ProgressCallback, PrinterCallback); process 0 alone."""
    from transformers.trainer_callback import ProgressCallback

    class RigplanProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.current_step = 0
            if not args.disable_tqdm:
                super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.training_bar is not None:
                super().on_step_end(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            line = progress_line(logs or {}, state.global_step, state.max_steps)
            if line is None or not state.is_world_process_zero:
                return
            if self.training_bar is not None:
                self.training_bar.write(line)
            else:
                print(line, flush=True)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.training_bar is not None:
                super().on_train_end(args, state, control, **kwargs)

    return RigplanProgress()


class GcWatch:
    """Python's garbage collections while training: how many and how long (the run summary's `gc`), and, with
    manual, the automatic collector paused so that collections run only where every process runs one
    (GC_EVERY_STEPS). gc.freeze() first moves the loaded model's objects out of every later collection's walk."""

    def __init__(self) -> None:
        self.manual, self.pauses, self._began = False, [], 0.0

    def _time(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append((info.get("generation", 2), time.perf_counter() - self._began))

    def start(self, manual: bool) -> None:
        import gc

        gc.collect()
        gc.freeze()
        self.manual = manual
        if manual:
            gc.disable()
        gc.callbacks.append(self._time)

    def collect(self) -> None:
        import gc

        gc.collect()

    def stop(self) -> None:
        import gc

        if self._time in gc.callbacks:
            gc.callbacks.remove(self._time)
        gc.enable()
        gc.unfreeze()

    def summary(self) -> dict[str, Any]:
        """Collections while training: count, total and longest seconds, whether they were aligned (manual)."""
        times = [t for _, t in self.pauses]
        return {"collections": len(times), "total_s": round(sum(times), 4),
                "longest_s": round(max(times, default=0), 4), "full": sum(1 for g, _ in self.pauses if g == 2),
                "aligned": self.manual}


def _padding_free(inputs: dict[str, Any]) -> bool:
    """A padding-free micro-batch: one row of examples back to back, position_ids restarting at 0 for each,
    no attention mask (TRL's collator, trl/trainer/sft_trainer.py:180-206)."""
    return "attention_mask" not in inputs and "position_ids" in inputs and inputs["input_ids"].shape[0] == 1


def examples_in(inputs: dict[str, Any]) -> int:
    """Examples in a collated micro-batch: its rows, or where a padding-free row's position_ids restart."""
    if _padding_free(inputs):
        return int((inputs["position_ids"][0] == 0).sum())
    return int(inputs["input_ids"].shape[0])


def split_micro_batch(inputs: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """A collated micro-batch as up to `parts` smaller ones of whole examples, for the out-of-memory backoff:
    padded ones cut along the batch, padding-free ones between examples (where position_ids restart)."""
    import torch

    ids = inputs["input_ids"]
    if not _padding_free(inputs):
        n = ids.shape[0]
        size = -(-n // parts)
        return [{k: v[i:i + size] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for k, v in inputs.items()}
                for i in range(0, n, size)]
    length = ids.shape[1]
    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
    cuts = starts[::-(-len(starts) // parts)] + [length]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        part = {k: v[:, a:b] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length else v
                for k, v in inputs.items()}
        if "packed_seq_lengths" in inputs:  # Unsloth's example lengths (unsloth/utils/packing.py:286-327)
            bounds = [x for x in starts if a <= x < b] + [b]
            old = inputs["packed_seq_lengths"]
            part["packed_seq_lengths"] = torch.tensor([y - x for x, y in zip(bounds, bounds[1:])],
                                                      dtype=old.dtype, device=old.device)
        out.append(part)
    return out


def _trainer_class(guard: "_Guard", engine: str = "transformers") -> Any:
    """TRL's SFTTrainer with rigplan's out-of-memory backoff and real-token count. The loss is the model's
    own causal-LM loss (the override TRL documents for a custom loss) on Unsloth, whose fused cross-entropy
    keeps the logits out of memory, and wherever TRL's chunked LM head cannot run (its kernels need Triton,
    which CPU builds of torch lack: trl/kernels/chunked_logprob.py). TRL's head is kept for transformers +
    PEFT on CUDA, where the model's own loss would build the full logits. TRL's head also logs entropy and
    token accuracy, reading three numbers back from the GPU every micro-batch (trl/trainer/sft_trainer.py:
    1638-1651): on the H100 rigplan ran 0.87x a bare Unsloth loop making the model's own loss call (padded
    LoRA, micro-batch 2: bench/results/h100-tp3-own-lora-padded.json)."""
    import torch
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    own = engine == "unsloth" or getattr(trl_utils, "_ChunkedLogProbFunction", None) is None

    class RigplanSFTTrainer(SFTTrainer):
        own_loss = own  # the model's own loss (compute_loss below), else TRL's chunked LM head
        _trainable: list[Any] | None = None
        _flops_per_token: int | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
            """On CUDA out-of-memory, halve the micro-batch (twice the accumulation) and redo this one:
            losses are normalised by the step's token count, so the parts add up to the same gradient.
            Several processes under DDP: every micro-batch backpropagates without DDP's all-reduce (no_sync), and
            the step's gradients are all-reduced once after its last one (all_reduce_gradients), so that a
            process that splits a micro-batch runs no collective the others do not; the split is then shared
            (_Guard.stop_agreed). Sharded (FSDP): no backoff, its reduce-scatter runs inside each backward."""
            if self._trainable is None:  # listed once: 2 ms for an 8B model with LoRA
                self._trainable = [p for p in model.parameters() if p.requires_grad]
            if guard.world.world_size > 1:
                if getattr(self, "is_fsdp_enabled", False):  # an out-of-memory error stops every process
                    guard.meet(inputs)
                    loss = super().training_step(model, inputs, num_items_in_batch)
                    guard.count(inputs)
                    return loss
                no_sync = getattr(model, "no_sync", None)
                with no_sync() if no_sync is not None else contextlib.nullcontext():
                    loss = self._backoff_step(model, inputs, num_items_in_batch)
                if self.accelerator.sync_gradients:  # the step's last micro-batch: clipping and the step follow
                    all_reduce_gradients(self._trainable, guard.world.world_size)
                return loss
            return self._backoff_step(model, inputs, num_items_in_batch)

        def _backoff_step(self, model, inputs, num_items_in_batch):  # noqa: ANN001
            params = self._trainable
            # This micro-batch accumulates into fresh gradients, apart from the sum of the step's earlier
            # ones, so that an out-of-memory error can drop what it added. Moving references costs nothing;
            # the clone of every LoRA gradient this replaced cost a launch per tensor (448 for an 8B model)
            # per micro-batch.
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None
            while True:
                parts = [inputs] if guard.split == 1 else split_micro_batch(inputs, guard.split)
                try:
                    total = None
                    for part in parts:
                        guard.meet(part)
                        loss = super().training_step(model, part, num_items_in_batch)
                        total = loss if total is None else total + loss
                    break
                except torch.OutOfMemoryError:
                    for p in params:  # drop what the failed backward had accumulated
                        p.grad = None
                    examples = examples_in(inputs)
                    if len(parts) >= examples:  # one example per part already
                        for p, grad in zip(params, earlier):
                            p.grad = grad
                        raise
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                        # The failed attempt's high-water mark is the card's limit, not this run's peak: the
                        # summary's measured peak (and what calibration learns from it) starts again here.
                        torch.cuda.reset_peak_memory_stats()
                    guard.split *= 2
                    guard.note_backoff(self.state.global_step, -(-examples // guard.split))
            # Add the earlier micro-batches back, all tensors in a few fused launches (torch._foreach_add_).
            new, old = [], []
            for p, grad in zip(params, earlier):
                if grad is not None and p.grad is None:
                    p.grad = grad
                elif grad is not None:
                    new.append(p.grad)
                    old.append(grad)
            if new:
                torch._foreach_add_(new, old)
            guard.count(inputs)
            return total

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001
            """Micro-batches of similar length reach the GPUs together (trainer/batching.py BlockSampler)."""
            from rigplan.trainer.batching import BlockSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return BlockSampler(len(dataset), guard.world.world_size, self.args.data_seed or self.args.seed)

        def _load_optimizer_and_scheduler(self, checkpoint):  # noqa: ANN001
            # Several CPU processes: transformers maps the optimizer state to args.device, "cpu:0", which
            # torch.load cannot restore (transformers/trainer.py _load_optimizer_and_scheduler); plain "cpu" can.
            if checkpoint is None or torch.cuda.is_available() or self.args.world_size == 1:
                return super()._load_optimizer_and_scheduler(checkpoint)
            import os

            self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu",
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

        def _load_rng_state(self, checkpoint):  # noqa: ANN001
            # Several CPU processes (gloo): torch cannot map rank N's saved CPU generator state back ("don't know
            # how to restore data location ... cpu:0"). The data order comes from the sampler's seed and epoch,
            # and LoRA here has no dropout, so the run goes on without it, and says so.
            try:
                super()._load_rng_state(checkpoint)
            except RuntimeError as e:
                print(f"rigplan: random state of this process not restored ({str(e).splitlines()[0][:80]}); the "
                      "data order does not depend on it", file=sys.stderr, flush=True)

        def floating_point_ops(self, inputs):  # noqa: ANN001
            # transformers counts the model's parameters anew for every micro-batch, walking every module and
            # parameter (transformers/trainer.py:4077-4081, modeling_utils.py:935-962): 4 ms of host time per
            # micro-batch for Llama-3.1-8B with LoRA (2,665 modules; timed on a CPU, on the meta device). The
            # count does not change: take it once.
            if self._flops_per_token is None:
                count = getattr(self.model, "num_parameters", None)
                self._flops_per_token = 6 * count(exclude_embeddings=True) if count is not None else 0
            ids = inputs.get("input_ids")
            return self._flops_per_token * ids.numel() if ids is not None else 0

        def get_batch_samples(self, epoch_iterator, num_batches, device=None):  # noqa: ANN001
            """The step's micro-batches and the targets its losses are normalised by (num_items_in_batch).
            Several processes: each counts its own, as transformers or Unsloth counts them (Unsloth's version
            replaces transformers' whenever Unsloth is imported, and marks the shapes' dynamic dimensions for its
            compiled blocks), and the counts are summed here on the devices, never read back to the host: asked
            to sum them itself, Unsloth's reads flags back after its gather (unsloth_zoo/loss_utils.py
            _unsloth_get_batch_samples), which made every process's host wait at each step's start for every
            GPU's previous step, a wait the bare DDP loop does not have (bench/ddp_overhead.py)."""
            if guard.world.world_size == 1 or not self.args.average_tokens_across_devices:
                return super().get_batch_samples(epoch_iterator, num_batches, device)
            import torch.distributed as dist

            self.args.average_tokens_across_devices = False  # this process's count only, for the moment
            try:
                batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            finally:
                self.args.average_tokens_across_devices = True
            if items is not None:
                if torch.is_tensor(items):
                    items = items.to(device or self.args.device)  # a sum made for this step: reduced in place
                else:  # a count the host holds: onto the device by a fill kernel, not a blocking copy
                    items = torch.full((), int(items), dtype=torch.int64, device=device or self.args.device)
                dist.all_reduce(items)
            return batches, items

        if own:
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
                # The Trainer sums micro-batch losses over accumulation and expects each normalised by the
                # tokens of the whole step (num_items_in_batch), as the model's own loss does when given it.
                # No cache, as TRL's compute_loss (trl/trainer/sft_trainer.py:1562): with one, transformers
                # skips the padding-free mask (transformers/masking_utils.py:855) and examples would attend to
                # each other. (The Trainer sets config.use_cache = args.use_cache, False: trainer.py:620.)
                extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
                outputs = model(**{**inputs, "use_cache": False}, **extra)
                loss = outputs.loss
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # Several processes: normalised by all of their targets, then averaged by DDP (or FSDP) over
                    # the processes; times their number, as transformers' and TRL's compute_loss do
                    # (transformers/trainer.py, trl/trainer/sft_trainer.py), so that the gradient and the logged
                    # loss are one GPU's on the same tokens (without it both were halved on two GPUs).
                    loss = loss * self.accelerator.num_processes
                return (loss, outputs) if return_outputs else loss

    return RigplanSFTTrainer


def all_reduce_gradients(params: list[Any], world_size: int) -> None:
    """The mean of every process's gradients, in place, as DDP's own all-reduce leaves them (it averages): one
    collective per dtype over a flat copy, after the step's last backward. DDP's buckets overlap the all-reduce
    with the backward pass instead; one all-reduce after it measured as fast on two H200s (8B LoRA, 8 x 1,280:
    1.016x one GPU's step against DDP's 1.024x; bench/results/README.md, the fifth session). A parameter without a
    gradient contributes zeros, so that every process reduces the same tensors."""
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[Any, list[Any]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world_size)
        torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))


def _all_ranks(measured: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Several processes: tokens, tokens/s and CPU memory summed over the ranks, memory the largest any GPU held."""
    import torch
    import torch.distributed as dist

    device = "cuda" if cuda else "cpu"
    summed = ("tokens", "tokens_per_s", "tokens_per_s_with_warmup", "tokens_per_s_compiled", "cpu_peak_rss_gib",
              "cpu_peak_anon_gib", "cpu_peak_file_gib", "cpu_peak_shmem_gib")
    peaks = ("peak_allocated_gib", "peak_reserved_gib", "nvml_peak_used_gib")
    values = torch.tensor([float(measured.get(k) or 0.0) for k in summed], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    out = {**measured, **{k: round(v, 3 if k.endswith("gib") else 1) for k, v in zip(summed, values.tolist())
                          if measured.get(k) is not None}}
    if cuda:
        most = torch.tensor([float(measured.get(k) or 0.0) for k in peaks], dtype=torch.float64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out.update({k: round(v, 3) for k, v in zip(peaks, most.tolist())})
    return out


def resident_gib(status: str | None = None) -> dict[str, float]:
    """This process's resident CPU memory by kind, from Linux's /proc/self/status (kB): RssAnon, its own (heap,
    tensors), RssFile, pages of files it maps (a safetensors checkpoint), which the page cache shares between
    processes and can drop, and RssShmem, shared memory. cpu_peak_rss_gib counts all three in every process, so
    summed over processes it counts a checkpoint they all map once each. Where offloaded shards are counted is not
    yet known: an offloaded sharded run's own and mapped peaks left 7.7 GiB of its 26.8 GiB RSS peak unexplained,
    about its offloaded weights (bench/results/h200x2-fsdp/after-fix/uint8/). {} where there is no such file."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return {}
    names = {"RssAnon": "cpu_peak_anon_gib", "RssFile": "cpu_peak_file_gib", "RssShmem": "cpu_peak_shmem_gib"}
    out = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in names and rest.split():
            out[names[key]] = int(rest.split()[0]) / 2**20
    return out


def cuda_uuid() -> str | None:
    """NVML's id of this process's CUDA device (the one torch allocates on), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"
    except (AttributeError, RuntimeError):  # a build without the field: NVML's first GPU is read instead
        return None


class MemorySampler:
    """The GPU memory in use as nvidia-smi shows it (NVML), sampled every SAMPLE_S on a thread during
    training: read afterwards it shows only what is still held (issue 14: 16.9 GiB after a 57.3 GiB peak). Every
    CPU_EVERY samples, this process's resident CPU memory by kind too (resident_gib): the peaks in cpu_peaks."""

    SAMPLE_S = 0.05
    CPU_EVERY = 10

    def __init__(self, gpu: bool = True) -> None:
        import threading

        self.gpu, self.peak = gpu, None
        self.cpu_peaks: dict[str, float] = {}
        self.uuid = cuda_uuid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from rigplan.profiles import nvml

        tick = 0
        while not self._stop.is_set():
            used = nvml.used_gib(uuid=self.uuid) if self.gpu else None
            if used is not None:
                self.peak = max(self.peak or 0.0, used)
            if tick % self.CPU_EVERY == 0:
                for k, v in resident_gib().items():
                    self.cpu_peaks[k] = max(self.cpu_peaks.get(k, 0.0), v)
            tick += 1
            self._stop.wait(self.SAMPLE_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        return self.peak
