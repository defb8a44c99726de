"""The rigplan command line: each command parses options, calls one library function, prints a table or --json.

No arithmetic here. Library code raises RigplanError; this module prints its one line and exits with 2.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from rigplan import errors
from rigplan.errors import RigplanError, require
from rigplan.estimator.planner import DEFAULT_EFFECTIVE_BATCH, DEFAULT_RANK, DEFAULT_SEQ_LEN

EXIT_USAGE = 2


def format_table(title: str, headers: list[str], rows: list[list[Any]], decimals: dict[str, int] | None = None) -> str:
    """One titled table: numbers right-aligned with fixed decimals, text left-aligned, units in headers."""
    decimals = decimals or {}

    def cell(h: str, v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.{decimals.get(h, 1)}f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    text = [[cell(h, v) for h, v in zip(headers, r)] for r in rows]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
               for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    rule = "-" * len(line(headers))
    return "\n".join([title, rule, line(headers), rule] + [line(r) for r in text] + [rule])


EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def _run(fn: Callable[[], Any], interrupted: str = "interrupted") -> Any:
    """Call library code; a RigplanError becomes one line on stderr and exit code 2, Ctrl-C one line and 130.
    Warnings are printed as they come (one line each), not after a long run."""
    def show(message: Any, *_args: Any, **_kwargs: Any) -> None:
        click.echo(str(message), err=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            return fn()
    except RigplanError as e:
        click.echo(f"rigplan: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo(f"rigplan: {interrupted}", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _emit(data: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


PLAN_HEADERS = ["", "engine", "method", "rank", "tokens/micro", "accum", "seq", "ckpt", "peak GiB", "total GiB",
                "tok/s", "time h"]


def _plan_cells(label: str, r: dict[str, Any]) -> list[Any]:
    # Checkpointing "unsloth" is Unsloth's offloaded kind; on transformers + PEFT it is PEFT's own: "on".
    ckpt = r["checkpointing"] if r["engine"] == "unsloth" or r["checkpointing"] == "off" else "on"
    return [label, r["engine"], r["method"], r["rank"], r["token_budget"], r["grad_accum"], r["seq"],
            ckpt, r["peak_reserved_gib"], r["total_gib"], round(r["tokens_per_s"]), r["train_hours"]]


def _render_check(d: dict[str, Any]) -> str:
    if d.get("gpu") is None:
        return _render_catalogue(d)
    verdict = ("FITS" if d["fits"] else "FITS ONLY AT A SHORTER SEQUENCE" if d["recommended"]
               else "DOES NOT FIT")
    rows = []
    if d["recommended"]:
        rows.append(_plan_cells("recommended", d["recommended"]))
    rows += [_plan_cells("alternative", a) for a in d["alternatives"]]
    title = (f"rigplan check: {d['model']} on {d['gpu_name']} ({d['gpu_memory_gib']:.1f} GiB, {d['gpu_source']})"
             + (f" x {d['num_gpus']}" if d["num_gpus"] > 1 else ""))
    reason = d["reason"].removeprefix("does not fit: ") if verdict == "DOES NOT FIT" else d["reason"]
    out = [title, f"verdict: {verdict}: {reason}"]
    if rows:
        out.append(format_table("", PLAN_HEADERS, rows, {"peak GiB": 1, "total GiB": 1, "time h": 2}).lstrip("\n"))
    out.append(f"memory: peak = torch peak reserved, total = what nvidia-smi shows (CUDA context included); "
               f"time: {d['workload']['source']}, {d['workload']['tokens']:,.0f} tokens x {d['workload']['epochs']:g} epoch(s)")
    out.append(f"calibration: {d['calibration']['label']}; {d['calibration']['note']}")
    if d["recommended"] and d["recommended"].get("example_tokens"):
        out.append(_data_speed_note(d["recommended"], d["workload"]["lengths_from_data"]))
    if d["recommended"] and d["recommended"]["host_bound"]:
        out.append(_host_bound_note(d["recommended"]))
    if d["recommended"] and d["recommended"]["num_gpus"] > 1:
        r = d["recommended"]
        out.append(f"gpus: {r['parallelism']} over {r['num_gpus']}; memory per GPU, tok/s for all of them"
                   + (f"; CPU memory, all processes: {r['cpu_memory_gib']:.1f} GiB ({_cpu_terms(r)})"
                      if r["cpu_memory_gib"] else "")
                   + (f"; weights: {r['model_path']}, loaded into CPU memory by each process" if r["load_on_cpu"]
                      else ""))
        if d.get("host_memory_note"):
            out.append(f"this machine ({d['host_memory_gib']:.0f} GiB of memory): {d['host_memory_note']}")
    out += _warning_lines(d)
    return "\n".join(out)


def _data_speed_note(r: dict[str, Any], lengths_known: bool) -> str:
    fill = r.get("fill") or 1.0
    how = ("only their mean length is known" if not lengths_known else
           f"examples packed into micro-batches of at most {r['token_budget']:,} tokens, {fill:.0%} filled"
           if r.get("batching") == "packed" else f"padded micro-batches, {fill:.0%} real tokens")
    return (f"speed: for the data's examples (mean {r['example_tokens']:,.0f} tokens), {how}; memory for a full "
            f"micro-batch of {r['token_budget']:,} tokens")


def _warning_lines(d: dict[str, Any]) -> list[str]:
    """Known issues under a table: each one's one-line summary (--json carries the whole notes too)."""
    return [f"warning: {w}" for w in d["warnings_short"]]


def _cpu_terms(r: dict) -> str:
    """A sharded plan's CPU memory term by term, in words."""
    words = {"checkpoint_read": "the checkpoint as read", "offloaded_weights": "offloaded weights",
             "process_runtime": "the processes' runtime"}
    terms = r.get("cpu_memory_terms_gib") or {}
    return ", ".join(f"{words[k]} {v:.1f}" for k, v in terms.items() if v)


def _host_bound_note(r: dict[str, Any]) -> str:
    low, high = r["tokens_per_s_band"]
    return (f"speed: host-bound (the CPU launching kernels sets the pace, not the GPU): {low:,.0f}-{high:,.0f} "
            "tok/s on the machines measured; rigplan calibrate measures this host, rigplan run its own rate")


def _render_catalogue(d: dict[str, Any]) -> str:
    rows = []
    for g in d["gpus"]:
        r = g["recommended"]
        mark = " (smallest)" if g["gpu"] == d["smallest_fitting"] else " (best per $)" if g["gpu"] == d["best_per_dollar"] else ""
        rows.append([g["gpu"] + mark, float(g["memory_gib"]), g["fits"], r and r["method"], r and r["rank"],
                     r and r["token_budget"], r and r["total_gib"], r and round(r["tokens_per_s"]), r and r["train_hours"],
                     g["price_usd"] and round(g["price_usd"]), g.get("tokens_per_s_per_kusd")])
    headers = ["gpu", "memory GiB", "fits", "method", "rank", "tokens/micro", "total GiB", "tok/s", "time h", "price $",
               "tok/s per k$"]
    each = f" x {d['num_gpus']} of each (memory per GPU, tok/s and price for all)" if d.get("num_gpus", 1) > 1 else ""
    table = format_table(f"rigplan check: {d['model']} on catalogue GPUs{each} (seq {d['seq']})", headers, rows,
                         {"memory GiB": 0, "total GiB": 1, "time h": 2, "tok/s per k$": 1})
    notes = [d.get("note", ""), f"smallest card that fits: {d['smallest_fitting']}; fastest per dollar: {d['best_per_dollar']}",
             f"time: {d['workload']['source']}; speeds scale the H100 reference calibration by each GPU's spec sheet"]
    return "\n".join([table] + [n for n in notes if n] + _warning_lines(d))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rigplan")
def main() -> None:
    """rigplan: what LLM fine-tuning your GPU can do, measured."""


def _data_opts(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data.")(f)
    f = click.option("--avg-tokens", type=float, help="Average tokens per example (with --examples).")(f)
    f = click.option("--examples", type=int, help="Number of training examples.")(f)
    f = click.option("--data", "data_file", type=click.Path(path_type=Path), help="JSONL/JSON dataset.")(f)
    return f


@main.command()
@click.argument("model")
@click.option("--gpu", default="auto", show_default=True, help="GPU id/name, or auto for the local one.")
@click.option("--gpus", "num_gpus", type=int, default=1, show_default=True,
              help="GPUs training together (DDP, or FSDP sharding when the model does not fit one).")
@click.option("--seq", "seq_len", type=int, help=f"Sequence length [default: {DEFAULT_SEQ_LEN}, or from --data].")
@click.option("--effective-batch", type=int, default=DEFAULT_EFFECTIVE_BATCH, show_default=True,
              help="Examples per optimizer step, all GPUs together.")
@click.option("--method", type=click.Choice(["lora", "qlora"]), help="Plan only this method [default: either].")
@click.option("--rank", type=int, help="Plan only this LoRA rank [default: the fastest of 8-64].")
@click.option("--max-seq", is_flag=True,
              help="The longest sequence each method trains at micro-batch 1 on this GPU (rank: --rank, 16).")
@_data_opts
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(model: str, gpu: str, num_gpus: int, seq_len: int | None, effective_batch: int, method: str | None,
          rank: int | None, max_seq: bool, data_file: Path | None, examples: int | None, avg_tokens: float | None,
          epochs: float, as_json: bool) -> None:
    """Does MODEL fit this GPU, with which settings, and how long will training take?"""
    from rigplan import planning as lib

    if max_seq:
        if num_gpus != 1:  # the search is one GPU's, micro-batch 1; sharding over several is not searched
            _run(lambda: errors.require([f"--max-seq answers for one GPU, not --gpus {num_gpus}; leave out --gpus"]))
        data = _run(lambda: lib.max_seq(model, gpu, DEFAULT_RANK if rank is None else rank))
        _emit(data, as_json, _render_max_seq)
        return
    data = _run(lambda: lib.check(model, gpu, num_gpus, seq_len, data_file, examples, avg_tokens, epochs,
                                  effective_batch, method=method, rank=rank))
    _emit(data, as_json, _render_check)


def _render_max_seq(d: dict[str, Any]) -> str:
    rows = [[m, d["max_seq"][m]] + ([p["checkpointing"], p["peak_reserved_gib"], p["total_gib"], round(p["tokens_per_s"])]
                                    if p else [None] * 4) for m, p in d["plans"].items()]
    table = format_table(f"rigplan check --max-seq: {d['model']} on {d['gpu_name']} ({d['gpu_memory_gib']:.1f} GiB), "
                         f"rank {d['rank']}, micro-batch 1",
                         ["method", "max seq", "ckpt", "peak GiB", "total GiB", "tok/s"], rows,
                         {"peak GiB": 1, "total GiB": 1})
    return "\n".join([table, "max seq: the longest sequence that fits with 10% of the GPU kept free (steps of 256)"]
                     + [f"{m}: {why}" for m, why in d["why_not"].items()]
                     + [f"calibration: {d['calibration']['label']}"] + _warning_lines(d))


@main.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["lora", "qlora"]), default="lora", show_default=True)
@click.option("--micro-batch", "batch", type=int, default=1, show_default=True,
              help="Sequences of --seq per micro-batch (the token budget is their product).")
@click.option("--seq", "seq_len", type=int, default=DEFAULT_SEQ_LEN, show_default=True)
@click.option("--rank", type=int, default=DEFAULT_RANK, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--checkpointing", type=click.Choice(["unsloth", "off"]), default="unsloth", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw_8bit", "adamw_torch"]), default="adamw_8bit", show_default=True)
@click.option("--gpu", default="auto", show_default=True, help="GPU id/name; auto: local, else h100-sxm.")
@click.option("--json", "as_json", is_flag=True)
def estimate(model: str, method: str, batch: int, seq_len: int, rank: int, grad_accum: int, checkpointing: str,
             optimizer: str, gpu: str, as_json: bool) -> None:
    """Memory, term by term, and speed of one configuration."""
    from rigplan import planning as lib

    data = _run(lambda: lib.estimate(model, method, batch, seq_len, rank, gpu, grad_accum, checkpointing, optimizer))

    def render(d: dict[str, Any]) -> str:
        rows = [[k, v] for k, v in d["components"].items() if v]  # a term of 0 says nothing here; --json lists all
        title = (f"rigplan estimate: {d['model']} {d['method']} r{d['rank']} micro-batch {d['micro_batch']} x seq "
                 f"{d['seq']} on {d['gpu']} ({d['gpu_memory_gib']:.1f} GiB, {d['engine']})")
        out = [format_table(title, ["memory term (not 0)", "GiB"], rows, {"GiB": 3})]
        out.append(f"peak allocated {d['peak_allocated_gib']:.2f} GiB, peak reserved {d['peak_reserved_gib']:.2f} GiB, "
                   f"total (nvidia-smi) {d['total_gib']:.2f} GiB: {'fits' if d['fits'] else 'DOES NOT FIT'}")
        out.append(f"speed {d['tokens_per_s']:,.0f} tok/s, {d['step_s']:.3f} s per step; calibration: {d['calibration']['label']}")
        if d["host_bound"]:
            out.append(_host_bound_note(d))
        out += _warning_lines(d)
        return "\n".join(out)

    _emit(data, as_json, render)


@main.command("plan")
@click.argument("model")
@click.option("--gpu", default="auto", show_default=True)
@click.option("--gpus", "num_gpus", type=int, default=1, show_default=True)
@click.option("--seq", "seq_len", type=int)
@click.option("--effective-batch", type=int, default=DEFAULT_EFFECTIVE_BATCH, show_default=True,
              help="Examples per optimizer step, all GPUs together.")
@click.option("--method", type=click.Choice(["lora", "qlora"]), help="Plan only this method [default: either].")
@click.option("--rank", type=int, help="Plan only this LoRA rank [default: the fastest of 8-64].")
@click.option("--data", "data_file", type=click.Path(path_type=Path))
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--model-path", help="Hub id or local directory to load weights from [default: the profile's hub id].")
@click.option("--out", type=click.Path(path_type=Path), help="Write the plan here (what rigplan run reads).")
def plan_cmd(model: str, gpu: str, num_gpus: int, seq_len: int | None, effective_batch: int, method: str | None,
             rank: int | None, data_file: Path | None, epochs: float, model_path: str | None, out: Path | None) -> None:
    """The recommended plan as JSON (to stdout, or --out FILE for rigplan run)."""
    from rigplan import planning as lib

    def plan_it() -> Any:
        errors.require(lib.plan_out_problems(out))  # before planning: --out must be writable
        return lib.make_plan(model, gpu, seq_len, data_file, effective_batch, num_gpus, epochs, model_path,
                             methods=(method,) if method else ("lora", "qlora"),
                             ranks=(rank,) if rank is not None else None)

    p = _run(plan_it)
    if out:
        _run(lambda: lib.save_plan(p, out))
        click.echo(f"wrote {out}: {p.engine} {p.method} r{p.rank}, {p.budget:,} tokens per micro-batch x "
                   f"{p.grad_accum}, seq {p.seq_len}, "
                   f"{p.total_gib:.1f} GiB, {p.tokens_per_s:,.0f} tok/s")
    else:
        click.echo(p.to_json())


@main.command()
@click.argument("model_or_plan")
@click.option("--data", "data_file", type=click.Path(path_type=Path), required=True, help="JSONL/JSON training data.")
@click.option("--gpu", default="auto", show_default=True, help="GPU to plan for; auto: the local one (CPU if none).")
@click.option("--epochs", type=float, help="Passes over the data [default: the plan's, 1].")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("rigplan-run"), show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan and the data report, then stop.")
@click.option("--skip-bad", is_flag=True, help="Drop bad records instead of stopping.")
@click.option("--overlong", type=click.Choice(["truncate", "drop"]), default="truncate", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--resume", is_flag=True,
              help="Continue from the last checkpoint in --out (the same weights, rank and GPUs).")
@click.option("--eval-fraction", type=float, help="Held-out share [default: 5% from 200 examples].")
@click.option("--patience", type=int, default=3, show_default=True, help="Evaluations without improvement.")
@click.option("--save-steps", type=int, default=50, show_default=True)
@click.option("--max-steps", type=int, default=-1, show_default=True)
@click.option("--merge", is_flag=True, help="Also write merged 16-bit weights.")
@click.option("--force", is_flag=True, help="Train even if the estimate says an override will not fit, or the plan "
              "needs more CPU memory than this machine reports.")
@click.option("--method", type=click.Choice(["lora", "qlora"]))
@click.option("--micro-batch", type=int, help="Sequences of --seq per micro-batch (its token budget is the product).")
@click.option("--grad-accum", type=int)
@click.option("--rank", type=int)
@click.option("--seq", "seq_len", type=int)
@click.option("--lr", "learning_rate", type=float)
@click.option("--engine", "engine_", type=click.Choice(["unsloth", "transformers"]),
              help="Override the plan's engine (re-estimated) [default: unsloth, transformers + PEFT for families "
                   "Unsloth fails on].")
@click.option("--batching", type=click.Choice(["packed", "padded"]),
              help="Override the plan's layout (the faster for your data): padded groups of --micro-batch "
                   "examples of similar length, or whole examples packed within the token budget.")
@click.option("--checkpointing", type=click.Choice(["unsloth", "off"]),
              help="Override the plan's gradient checkpointing (re-estimated): unsloth (activations recomputed, "
                   "offloaded to CPU memory under Unsloth) or off.")
@click.option("--gpus", "num_gpus", type=int,
              help="GPUs to plan for and train on (one process each, under torchrun) [default: the processes a "
                   "launcher such as torchrun started, else 1].")
@click.option("--parallelism", type=click.Choice(["ddp", "fsdp"]),
              help="Override how the plan spreads over --gpus (re-estimated): each GPU holds the model (ddp), or "
                   "the model is sharded over them (fsdp: FSDP2 on transformers + PEFT).")
@click.option("--cpu-offload/--no-cpu-offload", "cpu_offload", default=None,
              help="Override whether an FSDP plan keeps the frozen weights in CPU memory (re-estimated; FSDP only).")
@click.option("--optimizer", type=click.Choice(["adamw_8bit", "adamw_torch"]),
              help="Override the plan's optimizer (re-estimated): AdamW with 8-bit state (bitsandbytes, one update "
                   "kernel per tensor) or torch's AdamW (32-bit state, a few multi-tensor kernels per step).")
@click.option("--json", "as_json", is_flag=True,
              help="When training ends, the run summary (run_summary.json) as JSON on stdout; all else on stderr.")
def run(model_or_plan: str, data_file: Path, gpu: str, epochs: float | None, out_dir: Path, dry_run: bool,
        skip_bad: bool, overlong: str, overwrite: bool, resume: bool, eval_fraction: float | None, patience: int,
        save_steps: int, max_steps: int, merge: bool, force: bool, method: str | None, micro_batch: int | None,
        grad_accum: int | None, rank: int | None, seq_len: int | None, learning_rate: float | None,
        engine_: str | None, batching: str | None, checkpointing: str | None, num_gpus: int | None,
        parallelism: str | None, cpu_offload: bool | None, optimizer: str | None, as_json: bool) -> None:
    """Train MODEL (hub id, profile id or local directory) or a saved plan.json on --data."""
    import contextlib

    from rigplan import planning as lib
    from rigplan import store
    from rigplan.trainer import distributed, engine
    from rigplan.trainer import run as runlib

    if num_gpus is None:  # started under torchrun, accelerate launch or a cluster's launcher: one GPU per process
        num_gpus = distributed.world().world_size if distributed.launched() else 1

    if not distributed.world().main:  # one process per GPU: rank 0 alone prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    def say(message: str) -> None:  # --json: stdout holds the summary alone; rank 0 alone speaks
        if distributed.world().main:
            click.echo(message, err=as_json)

    # The processes `rigplan run` relaunched under torchrun: the launching process has shown the plan.
    show_plan = say if not distributed.relaunched() else (lambda _message: None)

    opts = runlib.RunOptions(data=data_file, out_dir=out_dir, skip_bad=skip_bad, overlong=overlong,  # type: ignore[arg-type]
                             overwrite=overwrite, resume=resume, eval_fraction=eval_fraction, patience=patience,
                             save_steps=save_steps, max_steps=max_steps, merge=merge)
    changes = {"method": method, "micro_batch": micro_batch, "grad_accum": grad_accum, "rank": rank,
               "seq_len": seq_len, "learning_rate": learning_rate, "epochs": epochs, "engine": engine_,
               "batching": batching, "checkpointing": checkpointing, "parallelism": parallelism,
               "cpu_offload": cpu_offload, "optimizer": optimizer}
    def check_inputs() -> None:  # everything typed, before any tokenizer or model loads (--dry-run too)
        engine.require_training_packages()
        runlib.check_options(opts, lib.run_problems(changes))
        lib.hub_id(model_or_plan)  # a known model, a readable config.json or a valid plan.json
        saved = lib.read_plan(Path(model_or_plan))
        errors.require(lib.optimizer_problems(changes, saved.parallelism if saved else None))
        if batching is not None:
            lib.require_batching(lib.model_of(model_or_plan), batching)

    _run(check_inputs)
    if resume:
        checkpoint, skipped = runlib.resume_point(out_dir)
        say(f"resuming from {checkpoint}" + (f"; skipped {', '.join(skipped)}: half-written (a crash cut it short)"
                                              if skipped else ""))
    engine.configure_allocator()  # before anything touches CUDA

    counts: dict[str, Any] = {}

    def plan_it() -> Any:
        local = lib.local_model_dir(model_or_plan)
        counted = counts["lengths"] = engine.count_tokens(local or lib.hub_id(model_or_plan), data_file, skip_bad)
        return lib.plan_for_run(model_or_plan, gpu, data_file, changes, force, skip_bad, counted=counted,
                                num_gpus=num_gpus)

    before = "interrupted before training started; nothing was trained"
    p = _run(plan_it, before)
    gpus = (f" x {p.num_gpus} ({p.parallelism}" + (", frozen weights in CPU memory" if p.cpu_offload else "") + ")"
            if p.num_gpus > 1 else "")
    show_plan(f"plan: {p.model} {p.method} r{p.rank} on {p.engine}, micro-batches of at most {p.budget:,} tokens "
              f"({p.batching}) x {p.grad_accum}, seq {p.seq_len}, {p.optimizer}, {p.epochs:g} epoch(s) on {p.gpu}{gpus}"
              + (f": {p.peak_reserved_gib:.1f} GiB peak reserved" + (" per GPU" if p.num_gpus > 1 else "")
                 + f", {p.tokens_per_s:,.0f} tok/s predicted"
                 + (f" (examples of {p.example_tokens:,.0f} tokens)" if p.example_tokens else "")
                 if p.total_gib else "")
              + (f"; weights {p.model_path}, loaded into CPU memory by each process" if p.load_on_cpu else ""))
    if num_gpus > 1 and p.num_gpus == 1 and p.gpu != "cpu":
        click.echo(f"rigplan: the plan trains on one of the {num_gpus} GPUs (`rigplan check --gpus {num_gpus}` says "
                   "why); --parallelism ddp or fsdp spreads it over them", err=True)
    if dry_run:
        click.echo(json.dumps(_run(lambda: runlib.dry_run_report(p, opts), before), indent=2))
        return
    _run(lambda: runlib.check_plan(p), before)
    if distributed.world().main and not distributed.relaunched():  # once, in the process that starts the others
        problems, warning = lib.cpu_memory_check(p, lib.host_memory_gib(), force)
        _run(lambda: require(problems), before)
        if warning:
            click.echo(f"rigplan: {warning}", err=True)
    if resume:  # before launching several processes that would each refuse it
        _run(lambda: require(runlib.resume_problems(p, out_dir)), before)
    _run(lambda: distributed.check_gpu_count(p.num_gpus, p.gpu == "cpu"), before)
    if p.num_gpus > 1 and not distributed.launched():
        sys.exit(_relaunch(p, opts, as_json))
    # Once training starts, Ctrl-C saves a checkpoint and the summary says 130; before or after it, _run does.
    # --json: what the engines and the Trainer print (banners, progress lines) goes to stderr too.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = _run(lambda: runlib.train(p, opts), "interrupted outside training (loading or saving); run again, "
                       "with --resume if a checkpoint was saved")
    several = distributed.world().world_size > 1
    if not distributed.world().main:
        distributed.exit_now(summary["exit_code"] if summary["status"] != "nan" else 1)
    if summary.get("measured", {}).get("peak_reserved_gib") is not None and p.gpu != "cpu":
        store.record_run(store.user_dir() / store.RUNS_LOG, summary, p.to_json(), counts.get("lengths"))
    say(_closing_lines(summary, out_dir))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    code = 0
    if summary["status"] == "nan":
        click.echo(f"rigplan: {summary['message']}", err=True)
        code = 1
    elif summary["exit_code"]:
        click.echo(f"rigplan: stopped by signal {summary['signal']}; checkpoint and adapter saved in {out_dir}; "
                   "continue with --resume", err=True)
        code = summary["exit_code"]
    if several:  # without tearing down the process group, which can hang (distributed.exit_now)
        distributed.exit_now(code)
    if code:
        sys.exit(code)


def _closing_lines(summary: dict[str, Any], out_dir: Path) -> str:
    """What a run did, measured beside the plan, in a few lines (run_summary.json holds every measurement)."""
    m, planned = summary.get("measured", {}), summary["predicted"]
    loss = "" if summary["first_loss"] is None else f"; loss {summary['first_loss']:.4g} -> {summary['final_loss']:.4g}"
    lines = [f"{summary['status']} after {summary['global_step']} steps in {summary['train_runtime_s']:,.0f} s{loss}"]

    def against(value: float | None, plan: float | None, unit: str, digits: int) -> str:
        if value is None:
            return "not measured"
        said = f"{value:,.{digits}f}{unit}"
        return said + (f" (plan {plan:,.{digits}f}, {value / plan - 1:+.1%})" if plan else "")

    several = " on the fullest GPU" if summary.get("world_size", 1) > 1 else ""
    d = summary.get("data") or {}
    short = (d.get("micro_batch_tokens_max") or 0) < (d.get("token_budget") or 0)
    if m.get("peak_reserved_gib") is not None:
        lines.append(f"peak reserved {against(m['peak_reserved_gib'], planned['peak_reserved_gib'], ' GiB', 2)}"
                     f"{several}" + (f"; the plan is for micro-batches of {d['token_budget']:,} tokens, this data's "
                                     f"longest is {d['micro_batch_tokens_max']:,}" if short else ""))
    if m.get("tokens_per_s"):  # after the warm-up steps, which compile
        lines.append(f"tokens/s {against(m['tokens_per_s'], planned['tokens_per_s'], '', 0)}"
                     + (" over all GPUs" if several else ""))
    lines.append(f"adapter: {summary.get('adapter')}; every measurement: {out_dir / 'run_summary.json'}")
    return "\n".join(lines)


def _relaunch(p: Any, opts: Any, as_json: bool = False) -> int:
    """This run again under torchrun, one process per GPU of the plan, each training the plan as written here
    (none plans again); returns torchrun's exit code. Several hosts: start the same command with torchrun's
    --nnodes/--rdzv-endpoint on each (docs/training.md)."""
    import subprocess
    import tempfile

    from rigplan.trainer import distributed

    plan_file = Path(tempfile.mkdtemp(prefix="rigplan-plan-")) / "plan.json"
    plan_file.write_text(p.to_json() + "\n")
    argv = ["run", str(plan_file), "--data", str(opts.data), "--out", str(opts.out_dir),
            "--overlong", opts.overlong, "--patience", str(opts.patience), "--save-steps", str(opts.save_steps),
            "--max-steps", str(opts.max_steps)]
    argv += ["--eval-fraction", str(opts.eval_fraction)] if opts.eval_fraction is not None else []
    argv += [flag for flag, on in (("--skip-bad", opts.skip_bad), ("--overwrite", opts.overwrite),
                                   ("--resume", opts.resume), ("--merge", opts.merge), ("--json", as_json)) if on]
    cmd = distributed.relaunch_command(p.num_gpus, argv)
    click.echo(f"launching {p.num_gpus} processes: {' '.join(cmd)}", err=True)
    try:
        return subprocess.call(cmd, env=distributed.launch_env(p.num_gpus))
    except KeyboardInterrupt:  # torchrun passes Ctrl-C on to every rank, which save and stop together
        return 130


@main.command()
@click.option("--model", "models", multiple=True, help="Architecture(s) to probe [default: llama-3.1-8b].")
@click.option("--methods", default="lora,qlora", show_default=True)
@click.option("--quick", is_flag=True, help="Three shapes per replica instead of four.")
@click.option("--json", "as_json", is_flag=True)
def calibrate(models: tuple[str, ...], methods: str, quick: bool, as_json: bool) -> None:
    """Measure this GPU with short training probes and fit rigplan's model to it."""
    from rigplan.calibration import calibrate as lib

    state: dict[str, Any] = {}

    def on_probe(done: int, total: int, row: dict[str, Any]) -> None:
        if as_json:
            return
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label="probing", item_show_func=lambda s: s)
            state["bar"].__enter__()
        if row:
            shape = f"{row['model']} {row['method']} {row['batch']}x{row['seq']}"
            state["bar"].update(1, shape + (f" {row['tok_per_s']:,.0f} tok/s" if row.get("tok_per_s") else " (oom)"))

    result = _run(lambda: lib.calibrate(tuple(models) or lib.DEFAULT_MODELS,
                                        tuple(m for m in methods.split(",") if m), quick, on_probe=on_probe))
    if "bar" in state:
        state["bar"].__exit__(None, None, None)

    def render(d: dict[str, Any]) -> str:
        rows = [[t["run"], None if t["peak_reserved_err"] is None else round(100 * t["peak_reserved_err"], 1),
                 None if t["tok_per_s_err"] is None else round(100 * t["tok_per_s_err"], 1)] for t in d["residuals"]["runs"]]
        table = format_table(f"rigplan calibrate: {d['gpu']}, {d['measured']} probes fitted",
                             ["probe", "memory err %", "tok/s err %"], rows, {"memory err %": 1, "tok/s err %": 1})
        return (f"{table}\nworst: memory {d['residuals']['max_abs_peak_reserved_err']:.1%}, speed "
                f"{d['residuals']['max_abs_tok_per_s_err']:.1%}; written to {d['path']}"
                + f" in {d['wall_s']:.0f} s"
                + (f"\nreal data: your {d['real_data']['runs']} rigplan run(s) on this GPU ran "
                   f"{d['real_data']['speed_over_plan']:.2f}x their plans' speed; plans now count it"
                   if d.get("real_data", {}).get("runs") else "")
                + (f"\n{len(d['failed'])} shape(s) did not run: " + "; ".join(d["failed"]) if d["failed"] else ""))

    _emit(result, as_json, render)


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("rigplan-report"), show_default=True)
@click.option("--calibration", type=click.Path(path_type=Path), help="A calibration file [default: the shipped H100 one].")
def report(out_dir: Path, calibration: Path | None) -> None:
    """Plots of predicted vs measured memory and speed, and the probes as CSV."""
    from rigplan.calibration import report as lib

    files = _run(lambda: lib.write_report(out_dir, calibration))
    click.echo("wrote " + ", ".join(files))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def gpus(as_json: bool) -> None:
    """The GPU catalogue."""
    from rigplan.profiles import catalog

    rows = [g for g in catalog.gpus()]
    data = {"gpus": [{"id": g.id, "name": g.name, "nvml_name": g.nvml_name, "memory_gib": g.memory_gib,
                      "bandwidth_gb_s": g.bandwidth_gb_s, "bf16_dense_tflops": g.bf16_dense_tflops,
                      "compute_capability": g.compute_capability, "bf16": g.bf16, "price_usd": g.price_usd,
                      "source": g.source} for g in rows]}
    _emit(data, as_json, lambda d: format_table(
        f"rigplan gpus: {len(rows)} GPUs", ["id", "name", "memory GiB", "bandwidth GB/s", "bf16 TFLOP/s", "cc", "price $"],
        [[g["id"], g["name"], float(g["memory_gib"]), float(g["bandwidth_gb_s"]), float(g["bf16_dense_tflops"]),
          g["compute_capability"], g["price_usd"] and round(g["price_usd"])] for g in d["gpus"]],
        {"memory GiB": 0, "bandwidth GB/s": 0, "bf16 TFLOP/s": 1}))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def models(as_json: bool) -> None:
    """The model catalogue."""
    from rigplan.profiles import catalog

    data = {"models": [{"id": m.id, "model_type": m.model_type, "params_b": round(m.params_total / 1e9, 2),
                        "layers": m.num_hidden_layers, "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
                        "context": m.max_position_embeddings, "hub_id": m.hub_id, "source": m.source,
                        "measured": catalog.measured_status(m)}
                       for m in catalog.models()]}
    _emit(data, as_json, lambda d: format_table(
        f"rigplan models: {len(d['models'])} models", ["id", "type", "params B", "layers", "hidden", "vocab", "context",
                                                       "measured", "hub id"],
        [[m["id"], m["model_type"], m["params_b"], m["layers"], m["hidden_size"], m["vocab_size"], m["context"],
          m["measured"], m["hub_id"]] for m in d["models"]], {"params B": 2})
        + "\nmeasured: fitted = in the reference fit's H100 runs; measured = its own GPU runs, terms beside them "
          "(profiles/known_issues.json); unmeasured = no GPU run yet; transformers = Unsloth fails on it, trained on "
          "transformers + PEFT")


if __name__ == "__main__":
    main()
