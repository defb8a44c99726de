"""Train a Plan with TRL's SFTTrainer: data checked before the model loads, safe stop on Ctrl-C/SIGTERM,
resume, NaN stop, eval with early stopping, and measured memory/speed saved beside the plan's prediction.

TRL and transformers own the loop, gradient accumulation and checkpoints; this module adds what they lack.
The trainer never re-plans: it runs the Plan it is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rigplan import data as datalib
from rigplan.errors import ConfigError, DataError, RigplanError
from rigplan.estimator.plan import Plan
from rigplan.trainer.batching import PackedCollator, PaddedCollator, grouped_rows, packed_rows, padded_length
from rigplan.trainer.options import (  # noqa: F401  (RunOptions and the checks are re-exported: callers import them here)
    CHECKPOINT_COMPLETE, DEFAULT_EVAL_FRACTION, DEFAULT_PATIENCE, DEFAULT_SAVE_STEPS, EVAL_MIN_EXAMPLES, RunOptions,
    check_options, check_out_dir, checkpoint_step, option_problems, out_dir_problems, resume_point, trim_metrics)

# Optimizer steps left out of the measured tokens/s: compile warm-up (15-40 s per new shape on the H100).
WARMUP_STEPS = 3
# On CUDA, log about this often rather than every step: a log is a host-device sync (the loss read with .item(),
# transformers/trainer.py:2175) and the logging callbacks, milliseconds, under 1% of 5 s.
LOG_EVERY_S = 5.0
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell's convention


@dataclass(frozen=True)
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    report: dict[str, Any]


def prepare_data(plan: Plan, tokenizer: Any, opts: RunOptions) -> PreparedData:
    """Validate every record (stop with line numbers unless skip_bad), tokenize, handle overlong examples,
    split off the eval set, report lengths, and lay out the micro-batches as the plan says (trainer/batching.py):
    padded groups of micro_batch examples of similar length, or packed rows within the token budget."""
    fmt, good, issues = datalib.validate(opts.data)
    if issues and not opts.skip_bad:
        raise DataError(datalib.issues_message(opts.data, issues))
    template = datalib.use_template(tokenizer, fmt)
    rows, lengths, overlong, answerless = [], [], 0, []
    for line, record in good:
        ids, labels = datalib.tokenize(record, fmt, tokenizer)
        lengths.append(len(ids))
        if len(ids) > plan.seq_len:
            overlong += 1
            if opts.overlong == "drop":
                continue
            ids, labels = ids[: plan.seq_len], labels[: plan.seq_len]
        if any(x != -100 for x in labels):
            rows.append({"input_ids": ids, "labels": labels})
        else:  # the prompt filled the sequence: nothing of the answer is left to train on
            answerless.append(line)
    if answerless:
        warnings.warn(f"rigplan: {len(answerless)} example(s) lost their whole answer to truncation at seq "
                      f"{plan.seq_len} and are left out (line(s) {', '.join(map(str, answerless[:5]))}"
                      f"{', ...' if len(answerless) > 5 else ''}); pass a longer --seq to train on them",
                      stacklevel=2)
    if not rows:
        raise DataError(f"{opts.data}: no example left to train on after validation and --overlong {opts.overlong}")
    fraction = opts.eval_fraction
    if fraction is None:
        fraction = DEFAULT_EVAL_FRACTION if len(rows) >= EVAL_MIN_EXAMPLES else 0.0
    order = list(range(len(rows)))
    random.Random(plan.seed).shuffle(order)
    n_eval = int(len(rows) * fraction)
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    report = {
        "file": str(opts.data), "format": fmt, "chat_template": template, "records": len(good) + len(issues),
        "bad_records": len(issues), "bad_shown": [dataclasses.asdict(i) for i in issues[: datalib.MAX_SHOWN]],
        "skipped_bad": len(issues) if opts.skip_bad else 0, "examples": len(rows), "train_examples": len(train_rows),
        "eval_examples": len(eval_rows), "tokens": sum(lengths),
        "trained_tokens": sum(sum(x != -100 for x in r["labels"]) for r in rows),
        "length_p50": datalib.percentile(lengths, 50), "length_p95": datalib.percentile(lengths, 95),
        "length_max": max(lengths), "seq_len": plan.seq_len, "overlong": overlong,
        "overlong_share": round(overlong / len(lengths), 4), "overlong_action": opts.overlong,
        "answer_truncated_away": len(answerless),
    }
    real = sum(len(r["input_ids"]) for r in train_rows)
    random_fill = non_padding_share([len(r["input_ids"]) for r in train_rows], plan.micro_batch, plan.seed)
    if plan.batching == "packed":
        train_rows, eval_rows = packed_rows(train_rows, plan.budget), packed_rows(eval_rows, plan.budget)
        computed = len(train_rows) * plan.budget  # rows are at most the budget; fill counts it whole
    else:
        train_rows = grouped_rows(train_rows, plan.micro_batch)
        eval_rows = grouped_rows(eval_rows, plan.micro_batch)
        computed = sum(len(r["input_ids"]) * padded_length(max(map(len, r["input_ids"])), plan.seq_len)
                       for r in train_rows)
    sizes = [batch_tokens(r, plan) for r in train_rows]
    report.update(batching=plan.batching, token_budget=plan.budget, micro_batches=len(train_rows),
                  micro_batch_tokens_max=max(sizes), fill=round(real / computed, 4),
                  examples_per_micro_batch=round(report["train_examples"] / len(train_rows), 2),
                  random_padded_fill=random_fill)  # had micro_batch examples been padded in random order
    return PreparedData(train_rows, eval_rows, report)


def dry_run_report(plan: Plan, opts: RunOptions) -> dict[str, Any]:
    """What a run would train on (the data report, tokenized with the model's tokenizer), without training."""
    from rigplan.trainer.engine import import_engine, model_source, require_weights

    require_weights(plan.model_path)
    cuda = _cuda()
    if plan.gpu != "cpu" and not cuda:
        warnings.warn(f"rigplan: {no_cuda_message(plan)}", stacklevel=2)
    import_engine(plan.engine) if plan.engine == "unsloth" and cuda else None
    from transformers import AutoTokenizer

    path, local = model_source(plan.model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    return {"plan": json.loads(plan.to_json()), "data_report": prepare_data(plan, tokenizer, opts).report}


def no_cuda_message(plan: Plan) -> str:
    return (f"this plan is for {plan.gpu}, but this machine has no CUDA GPU: its memory and speed would not "
            f"hold; train it on a {plan.gpu}, or plan for this machine with rigplan run {plan.model} --gpu auto")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def batch_tokens(row: dict[str, Any], plan: Plan) -> int:
    """Tokens a micro-batch computes, padding included: at most the plan's token budget."""
    if plan.batching == "packed":
        return len(row["input_ids"])
    return len(row["input_ids"]) * padded_length(max(map(len, row["input_ids"])), plan.seq_len)


def non_padding_share(lengths: list[int], micro_batch: int, seed: int) -> float:
    """Expected share of real tokens when random micro-batches are padded to their longest example."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    padded = sum(max(b) * len(b) for b in batches)
    return round(sum(lengths) / padded, 4) if padded else 1.0


def logging_steps(step_s: float, save_steps: int) -> int:
    """Optimizer steps between logs: about LOG_EVERY_S of predicted step time, and a divisor of save_steps,
    so that a log (and its NaN check) comes right before every checkpoint is written."""
    target = math.ceil(LOG_EVERY_S / step_s) if step_s > 0 else 1
    return max(n for n in range(1, max(1, min(target, save_steps)) + 1) if save_steps % n == 0 or n == 1)


def sft_config_from_plan(plan: Plan, out_dir: Path, opts: RunOptions, has_eval: bool, cuda: bool,
                         bf16: bool) -> Any:
    """The one place a TRL SFTConfig is built. Fields set here differ from TRL's defaults or matter to
    rigplan; the rest are TRL's (https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig)."""
    import importlib.util

    from trl import SFTConfig

    from rigplan.trainer.distributed import world

    return SFTConfig(
        # Each dataset row is already one micro-batch within the token budget, collated by trainer/batching.py
        # (packed: position_ids restart at each example, so Unsloth attends within examples and transformers
        # builds a block-diagonal mask from them when no cache is passed, transformers/masking_utils.py).
        # TRL's own padding-free collator and packing stay off: explicit, because Unsloth turns an unset
        # padding_free on by itself (unsloth/trainer.py); a custom collator makes it leave both off.
        padding_free=False,
        # prepare_data has already cut or dropped every example longer than the plan's seq_len.
        max_length=None,
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=1,  # each dataset row is one micro-batch (trainer/batching.py)
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=plan.epochs,
        max_steps=opts.max_steps,
        learning_rate=plan.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=5,  # Unsloth's notebooks
        weight_decay=0.01,
        optim="adamw_8bit" if cuda and plan.optimizer == "adamw_8bit" else "adamw_torch",
        bf16=cuda and bf16,
        fp16=cuda and not bf16,
        gradient_checkpointing=False,  # the engine set it up (Unsloth's or PEFT's)
        logging_steps=logging_steps(plan.step_s, opts.save_steps) if cuda else 1,
        # transformers' default (True) replaces a NaN or infinite loss by the running mean, which hid NaNs from
        # the guard, and reads each micro-batch's loss on the host, a sync (transformers/trainer.py:1843-1849).
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=opts.save_steps if has_eval else None,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        seed=plan.seed,
        data_seed=plan.seed,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,
        # Several processes (trainer/distributed.py): NCCL on GPUs, gloo on CPUs; every adapter gets a gradient,
        # so DDP need not search for unused parameters each step.
        ddp_backend=None if cuda or world().world_size == 1 else "gloo",
        ddp_find_unused_parameters=False,
    )


class _Guard:
    """Signal flag, NaN watch, metrics log and token count, as one TrainerCallback (built lazily:
    transformers is heavy)."""

    def __init__(self, out_dir: Path, sync: Any = None) -> None:
        self.out_dir = out_dir
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
        self.backoffs: list[dict[str, int]] = []
        from rigplan.trainer.distributed import world

        self.world = world()
        self.main = self.world.main  # rank 0 alone writes files

    def count(self, inputs: dict[str, Any]) -> None:
        """Add a micro-batch's real tokens: its attention mask's sum when padded; all of its one row when
        padding-free (TRL's collator then sends no mask and no padding)."""
        mask = inputs.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())

    def note_backoff(self, step: int, micro_batch: int) -> None:
        """An out-of-memory error made the trainer split micro-batches: logged to metrics.jsonl and stderr."""
        self.backoffs.append({"step": step, "micro_batch": micro_batch})
        if not self.main:
            return
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "event": "oom_backoff", "micro_batch": micro_batch}) + "\n")
        print(f"rigplan: CUDA out of memory at step {step}: micro-batch now {micro_batch}, accumulation doubled",
              file=sys.stderr, flush=True)

    def steady_tokens_per_s(self) -> float | None:
        """Real tokens/s after the warm-up steps (Unsloth compiles each decoder block in the first ones)."""
        w, n = self.warmup, len(self.step_times)
        if n - w < 2:
            return None
        tokens = float(self.step_tokens[-1]) - float(self.step_tokens[w])
        return round(tokens / (self.step_times[-1] - self.step_times[w]), 1)

    def eta_s(self, steps_left: int) -> float | None:
        """Seconds left at this run's own pace since the warm-up steps (the first ones compile; the plan's
        predicted speed is not used: host-bound speeds differ between machines)."""
        w, n = self.warmup, len(self.step_times)
        if n - w < 2:
            return None
        return steps_left * (self.step_times[-1] - self.step_times[w]) / (n - 1 - w)

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum  # acted on at the end of the current step: save, then stop

    def stop_agreed(self) -> bool:
        """Whether to save and stop after this step. Several processes stop together: a signal any of them got
        (torchrun forwards Ctrl-C to each, not at the same instant) is shared with an all-reduce every step,
        so that all save the same checkpoint and none waits on a collective the others have left."""
        if self.world.world_size == 1:
            return self.signal is not None
        import torch
        import torch.distributed as dist

        got = torch.tensor([self.signal or 0], dtype=torch.int64,
                           device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(got, op=dist.ReduceOp.MAX)
        if got.item() and self.signal is None:
            self.signal = int(got.item())
        return self.signal is not None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                guard.t0 = time.perf_counter()
                steps = state.max_steps - state.global_step  # in this process (a resumed run starts later)
                guard.warmup, guard.last_index = min(WARMUP_STEPS, steps // 4), steps - 1
                return control

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                # The two clock readings the steady tokens/s is taken between wait for the GPU; the others
                # are for progress only and stay asynchronous.
                if guard.sync is not None and len(guard.step_times) in (guard.warmup, guard.last_index):
                    guard.sync()
                guard.step_times.append(time.perf_counter())
                guard.step_tokens.append(guard.tokens)
                if guard.stop_agreed():
                    control.should_save = True
                    control.should_training_stop = True
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
                if "loss" in logs and elapsed:  # shown in the progress lines (this callback runs first)
                    logs["tokens_per_s"] = round(float(guard.tokens) / elapsed, 1)
                    eta = guard.eta_s(state.max_steps - state.global_step)
                    if eta is not None:
                        logs["eta_s"] = round(eta, 2)
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                if guard.main:
                    with (guard.out_dir / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(row) + "\n")
                return control

        return Callback()


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

    fused = engine != "unsloth" and getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None

    class RigplanSFTTrainer(SFTTrainer):
        split = 1  # micro-batches are cut into this many parts after out-of-memory errors
        _trainable: list[Any] | None = None
        _flops_per_token: int | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
            """On CUDA out-of-memory, halve the micro-batch (twice the accumulation) and redo this one:
            losses are normalised by the step's token count, so the parts add up to the same gradient."""
            if self._trainable is None:  # listed once: 2 ms for an 8B model with LoRA
                self._trainable = [p for p in model.parameters() if p.requires_grad]
            params = self._trainable
            # This micro-batch accumulates into fresh gradients, apart from the sum of the step's earlier
            # ones, so that an out-of-memory error can drop what it added. Moving references costs nothing;
            # the clone of every LoRA gradient this replaced cost a launch per tensor (448 for an 8B model)
            # per micro-batch.
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None
            while True:
                parts = [inputs] if self.split == 1 else split_micro_batch(inputs, self.split)
                try:
                    total = None
                    for part in parts:
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
                    self.split *= 2
                    guard.note_backoff(self.state.global_step, -(-examples // self.split))
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

        if not fused:
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
                # The Trainer sums micro-batch losses over accumulation and expects each normalised by the
                # tokens of the whole step (num_items_in_batch), as the model's own loss does when given it.
                # No cache, as TRL's compute_loss (trl/trainer/sft_trainer.py:1562): with one, transformers
                # skips the padding-free mask (transformers/masking_utils.py:855) and examples would attend to
                # each other. (The Trainer sets config.use_cache = args.use_cache, False: trainer.py:620.)
                extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
                outputs = model(**{**inputs, "use_cache": False}, **extra)
                return (outputs.loss, outputs) if return_outputs else outputs.loss

    return RigplanSFTTrainer


def _last_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint transformers finished writing (marked by the guard's on_save)."""
    return resume_point(out_dir)[0]


def _measured(cuda: bool, trained_tokens: float, runtime_s: float, steady: float | None,
              nvml_peak: float | None = None) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"tokens": round(trained_tokens), "tokens_per_s": steady, "tokens_per_s_with_warmup":
                           round(trained_tokens / runtime_s, 1) if runtime_s else None}
    if cuda:
        from rigplan.profiles import nvml

        gib = 2**30
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 3),
                   nvml_peak_used_gib=round(nvml_peak, 3) if nvml_peak is not None else None,
                   nvml_used_after_gib=nvml.used_gib())
    return out


def check_plan(plan: Plan) -> None:
    """What this trainer cannot train, refused before anything loads: FSDP plans are estimated (rigplan check
    --gpus) but not yet trained; DDP is."""
    if plan.parallelism == "fsdp":
        raise ConfigError(f"this plan shards the model over {plan.num_gpus} GPUs (FSDP), which rigplan run does not "
                          "train yet; pass --gpus 1, or a model that each GPU holds whole (a DDP plan)")


def train(plan: Plan, opts: RunOptions) -> dict[str, Any]:
    """Run the plan with the engine it names. Returns what happened (`status`: done, interrupted, nan,
    early_stopped), where the adapter is, what was measured beside what the plan predicted, and the provenance;
    raises RigplanError for what the user must fix, before anything loads where possible."""
    from rigplan.trainer.engine import import_engine, load, model_source, provenance, require_weights

    check_options(opts)
    check_plan(plan)
    import torch

    cuda = torch.cuda.is_available()
    if plan.gpu != "cpu" and not cuda:
        raise ConfigError(no_cuda_message(plan))
    if plan.method == "qlora" and not cuda:  # said here, not once the tokenizer and data are done
        raise ConfigError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); pass --method lora on this machine")
    require_weights(plan.model_path)  # in a second when offline, not after a minute of retries
    import_engine(plan.engine)  # Unsloth before transformers, peft and trl: it patches them on import
    from transformers import AutoTokenizer, EarlyStoppingCallback

    out = Path(opts.out_dir)
    checkpoint = _last_checkpoint(out) if opts.resume else None
    path, local = model_source(plan.model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    prepared = prepare_data(plan, tokenizer, opts)  # every data problem surfaces before the model loads

    from datasets import Dataset
    from transformers import set_seed

    # PEFT draws the adapters' initial weights from the global RNG at load time, before the Trainer seeds:
    # seed first, or two runs of one plan start from different adapters.
    set_seed(plan.seed)
    model, tokenizer = load(plan)
    # Written once the model has loaded: a run stopped before (Ctrl-C, a failed download) leaves --out as it was.
    from rigplan.trainer.distributed import world

    main = world().main  # several processes: rank 0 alone writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(plan.to_json() + "\n")
        (out / "data_report.json").write_text(json.dumps(prepared.report, indent=2) + "\n")
        if checkpoint:
            trim_metrics(out, checkpoint_step(Path(checkpoint)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    has_eval = bool(prepared.eval)
    args = sft_config_from_plan(plan, out, opts, has_eval, cuda, cuda and torch.cuda.is_bf16_supported())
    guard = _Guard(out, torch.cuda.synchronize if cuda else None)
    callbacks = [guard.callback()] + ([EarlyStoppingCallback(early_stopping_patience=opts.patience)] if has_eval else [])
    collator = (PackedCollator(tokenizer.pad_token_id) if plan.batching == "packed"
                else PaddedCollator(tokenizer.pad_token_id, plan.seq_len))
    trainer = _trainer_class(guard, plan.engine)(
        model=model, args=args, train_dataset=Dataset.from_list(prepared.train),
        eval_dataset=Dataset.from_list(prepared.eval) if has_eval else None, processing_class=tokenizer,
        callbacks=callbacks, data_collator=collator)
    handler = trainer.callback_handler  # our callback first, so the progress printer shows its tokens/s
    handler.callbacks.insert(0, handler.callbacks.pop(handler.callbacks.index(callbacks[0])))
    previous = {s: signal.signal(s, guard.handle) for s in EXIT_SIGNAL}
    sampler = MemorySampler() if cuda else None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            sampler.start()
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        runtime = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:  # even one example per micro-batch does not fit
        raise RigplanError(f"CUDA out of memory at step {trainer.state.global_step} with one example per "
                           f"micro-batch; resume with --resume --seq {plan.seq_len // 2} or --method qlora "
                           f"(last checkpoint: {_last_checkpoint(out)})") from e
    finally:
        nvml_peak = sampler.stop() if sampler else None
        for s, handler in previous.items():
            signal.signal(s, handler)

    from rigplan.trainer.export import write_outputs

    status = ("interrupted" if guard.signal is not None else "nan" if guard.nan_step is not None
              else "early_stopped" if has_eval and trainer.state.global_step < trainer.state.max_steps else "done")
    measured = _measured(cuda, float(guard.tokens), runtime, guard.steady_tokens_per_s(), nvml_peak)
    if world().world_size > 1:
        measured = _all_ranks(measured, cuda)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {"status": status, "engine": plan.engine, "gpu": plan.gpu, "method": plan.method,
               "global_step": trainer.state.global_step,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "best_eval_loss": min(evals) if evals else None, "train_runtime_s": round(runtime, 2),
               "train_loss": getattr(result, "training_loss", None), "measured": measured,
               "predicted": {"peak_allocated_gib": plan.peak_allocated_gib, "peak_reserved_gib": plan.peak_reserved_gib,
                             "total_gib": plan.total_gib, "tokens_per_s": plan.tokens_per_s,
                             "tokens_per_s_band": [plan.tokens_per_s_low, plan.tokens_per_s_high]},
               "data": {k: prepared.report.get(k) for k in ("examples", "tokens", "length_p50", "length_p95",
                                                            "length_max", "batching", "token_budget", "fill",
                                                            "micro_batches", "micro_batch_tokens_max")},
               "oom_backoffs": guard.backoffs, "signal": guard.signal,
               "exit_code": EXIT_SIGNAL.get(guard.signal, 0) if guard.signal else 0, "provenance": provenance()}
    summary["world_size"] = world().world_size
    if status == "nan":
        summary["message"] = (f"loss became NaN or infinite by step {guard.nan_step}; last good checkpoint: "
                              f"{_last_checkpoint(out)}; lower the learning rate and --resume")
        if main:
            (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    if main:
        summary.update(write_outputs(trainer.model, tokenizer, plan, out, prepared.report, summary, opts.merge))
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _all_ranks(measured: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Several processes: tokens and tokens/s summed over the ranks, memory the largest any GPU held."""
    import torch
    import torch.distributed as dist

    device = "cuda" if cuda else "cpu"
    summed = ("tokens", "tokens_per_s", "tokens_per_s_with_warmup")
    peaks = ("peak_allocated_gib", "peak_reserved_gib", "nvml_peak_used_gib")
    values = torch.tensor([float(measured.get(k) or 0.0) for k in summed], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    out = {**measured, **{k: round(v, 1) for k, v in zip(summed, values.tolist()) if measured.get(k) is not None}}
    if cuda:
        most = torch.tensor([float(measured.get(k) or 0.0) for k in peaks], dtype=torch.float64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out.update({k: round(v, 3) for k, v in zip(peaks, most.tolist())})
    return out


class MemorySampler:
    """The GPU memory in use as nvidia-smi shows it (NVML), sampled every SAMPLE_S on a thread during
    training: read afterwards it shows only what is still held (issue 14: 16.9 GiB after a 57.3 GiB peak)."""

    SAMPLE_S = 0.05

    def __init__(self) -> None:
        import threading

        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from rigplan.profiles import nvml

        while not self._stop.is_set():
            used = nvml.used_gib()
            if used is not None:
                self.peak = max(self.peak or 0.0, used)
            self._stop.wait(self.SAMPLE_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        return self.peak
