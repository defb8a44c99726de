"""Nothing a user types crashes rigplan or gets a wrong answer silently (issue 15): every bad input below exits
with 2 and one line on stderr, `rigplan: ` then what is wrong and what to do, no traceback, and nothing written
to the output directory or the calibration folder ($RIGPLAN_HOME). `run`'s cases are refused before any
tokenizer or model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from rigplan.cli import main

# A refusal says what to do: one of these verbs (or "did you mean").
ACTIONS = ("pass ", "drop ", "fix ", "use ", "run ", "install", "change", "create", "point ", "lower ", "add ",
           "split", "check ", "train it", "did you mean", "unset", "make one", "pick ", "log in", "move ")
ALPACA = {"instruction": "say hi", "output": "hi"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128_256, "max_position_embeddings": 131_072}
# Trimmed from deepseek-ai/DeepSeek-V3's config.json (https://huggingface.co/deepseek-ai/DeepSeek-V3).
DEEPSEEK_V3_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
                      "intermediate_size": 18_432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                      "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                      "n_shared_experts": 1, "num_experts_per_tok": 8, "vocab_size": 129_280,
                      "max_position_embeddings": 163_840}
# Trimmed from google-bert/bert-base-uncased's config.json.
BERT_CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
               "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 30_522,
               "max_position_embeddings": 512}


@dataclass
class Workspace:
    """A folder of inputs; `out` and `home` are where nothing may be written."""

    root: Path
    home: Path = field(init=False)
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.root / "home"  # $RIGPLAN_HOME: must stay absent
        self.out = self.root / "out"  # --out: must stay absent

    def data(self, *records: object, name: str = "d.jsonl") -> str:
        f = self.root / name
        f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
        return str(f)

    def good_data(self) -> str:
        return self.data(*[ALPACA] * 20, name="good.jsonl")

    def config(self, **changes: object) -> str:
        d = self.root / "model"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **changes}))
        return str(d)

    def file(self, name: str, text: str | bytes = "x") -> str:
        f = self.root / name
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
        return str(f)

    def plan(self, **changes: object) -> str:
        from rigplan.estimator.plan import Plan

        base = dict(model="llama-3.2-1b", model_path=str(self.root / "model"), gpu="cpu", method="lora", rank=16,
                    micro_batch=4, grad_accum=1, seq_len=256, target_modules=("q_proj",), optimizer="adamw_torch",
                    engine="transformers")
        (self.root / "model").mkdir(exist_ok=True)
        f = self.root / "plan.json"
        f.write_text(Plan(**{**base, **changes}).to_json())
        return str(f)

    def calibration(self, **coefficients: float) -> str:
        from rigplan import store

        doc = json.loads(store.REFERENCE_FILE.read_text())
        doc["coefficients"].update(coefficients)
        return self.file("calibration.json", json.dumps(doc).replace("NaN", "NaN"))

    def checkpoint(self, step: int, complete: bool) -> None:
        d = self.out / "checkpoints" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if complete:
            (d / "rigplan_complete.json").write_text(json.dumps({"step": step}))


Case = Callable[[Workspace], list[str]]
CHECK = ["check", "llama-3.1-8b", "--gpu", "rtx-4090"]
ESTIMATE = ["estimate", "llama-3.1-8b", "--gpu", "rtx-4090"]
PLAN = ["plan", "llama-3.1-8b", "--gpu", "rtx-4090"]


def run_(w: Workspace, *extra: str) -> list[str]:
    return ["run", "llama-3.2-1b", "--data", w.good_data(), "--out", str(w.out), *extra]


# (id, args built in the workspace, words the message must contain)
CASES: list[tuple[str, Case, str]] = [
    # --- check / plan / estimate: numbers
    ("check-data-missing", lambda w: CHECK + ["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl does not exist"),
    ("plan-data-missing", lambda w: PLAN + ["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl does not exist"),
    ("check-data-directory", lambda w: CHECK + ["--data", str(w.root)], "is a directory"),
    ("check-avg-tokens-nan", lambda w: CHECK + ["--examples", "100", "--avg-tokens", "nan"], "--avg-tokens nan"),
    ("check-avg-tokens-nan-alone", lambda w: CHECK + ["--avg-tokens", "nan"], "--avg-tokens nan"),
    ("check-avg-tokens-inf", lambda w: CHECK + ["--examples", "100", "--avg-tokens", "inf"], "--avg-tokens inf"),
    ("check-examples-0", lambda w: CHECK + ["--examples", "0", "--avg-tokens", "100"], "--examples 0"),
    ("check-examples-without-avg-tokens", lambda w: CHECK + ["--examples", "1000"], "--examples needs --avg-tokens"),
    ("check-avg-tokens-without-examples", lambda w: CHECK + ["--avg-tokens", "500"], "--avg-tokens needs --examples"),
    ("check-data-and-examples", lambda w: CHECK + ["--data", w.good_data(), "--examples", "9", "--avg-tokens", "9"],
     "not both"),
    ("check-seq-0", lambda w: CHECK + ["--seq", "0"], "--seq 0"),
    ("check-seq-negative", lambda w: CHECK + ["--seq", "-5"], "--seq -5"),
    ("check-seq-beyond-context", lambda w: CHECK + ["--seq", "200000"], "exceeds llama-3.1-8b's context (131072)"),
    ("check-epochs-nan", lambda w: CHECK + ["--epochs", "nan"], "--epochs nan"),
    ("check-epochs-inf", lambda w: CHECK + ["--epochs", "inf"], "--epochs inf"),
    ("check-epochs-0", lambda w: CHECK + ["--epochs", "0"], "--epochs 0"),
    ("check-epochs-negative", lambda w: CHECK + ["--epochs", "-1"], "--epochs -1"),
    ("check-rank-0", lambda w: CHECK + ["--rank", "0"], "--rank 0"),
    ("check-rank-negative", lambda w: CHECK + ["--rank", "-8"], "--rank -8"),
    ("check-gpus-0", lambda w: CHECK + ["--gpus", "0"], "--gpus 0"),
    ("check-effective-batch-0", lambda w: CHECK + ["--effective-batch", "0"], "--effective-batch 0"),
    ("check-several-at-once", lambda w: CHECK + ["--seq", "0", "--rank", "-1", "--epochs", "nan"],
     "--seq 0: pass a whole number >= 1; --rank -1"),
    ("estimate-micro-batch-negative", lambda w: ESTIMATE + ["--micro-batch", "-1"], "--micro-batch -1"),
    ("estimate-seq-0", lambda w: ESTIMATE + ["--seq", "0"], "--seq 0"),
    ("estimate-grad-accum-0", lambda w: ESTIMATE + ["--grad-accum", "0"], "--grad-accum 0"),
    ("estimate-rank-0", lambda w: ESTIMATE + ["--rank", "0"], "--rank 0"),
    ("plan-rank-0", lambda w: PLAN + ["--rank", "0"], "--rank 0"),
    ("plan-does-not-fit", lambda w: ["plan", "llama-3.1-70b", "--gpu", "rtx-4090"], "does not fit"),
    # --- names
    ("unknown-model", lambda w: ["check", "lama-3.1-8b", "--gpu", "rtx-4090"], "did you mean 'llama-3.1-8b'"),
    ("unknown-gpu", lambda w: ["check", "llama-3.1-8b", "--gpu", "rtx-9999"], "unknown GPU 'rtx-9999'"),
    ("unknown-model-path", lambda w: ["check", "./no/such/config.json", "--gpu", "rtx-4090"], "unknown model"),
    # --- config.json
    ("config-zero-heads", lambda w: ["check", w.config(num_attention_heads=0), "--gpu", "rtx-4090"],
     "num_attention_heads 0 must be a positive integer"),
    ("config-missing-size", lambda w: ["check", w.config(hidden_size=None), "--gpu", "rtx-4090"],
     "hidden_size None must be a positive integer"),
    ("config-text-size", lambda w: ["check", w.config(vocab_size="many"), "--gpu", "rtx-4090"], "vocab_size 'many'"),
    ("config-bert", lambda w: ["check", w.config(**BERT_CONFIG), "--gpu", "rtx-4090"],
     "BertForMaskedLM is not a causal language model"),
    ("config-deepseek-v3-moe", lambda w: ["check", w.config(**DEEPSEEK_V3_CONFIG), "--gpu", "h200"],
     "model_type 'deepseek_v3' is not one rigplan can estimate"),
    ("config-moe-of-a-dense-type", lambda w: ["check", w.config(model_type="qwen3", num_experts=128,
                                                                num_experts_per_tok=8), "--gpu", "h200"],
     "mixture-of-experts layers (num_experts, num_experts_per_tok) are not supported yet"),
    ("config-not-an-object", lambda w: ["check", w.file("config.json", "[1, 2]"), "--gpu", "rtx-4090"],
     "not a JSON object"),
    # --- data files
    ("data-mixed-formats", lambda w: CHECK + ["--data", w.data(ALPACA, ALPACA, CHAT, ALPACA)],
     "line 3: a chat record in a file of 3 alpaca records"),
    ("data-chat-without-assistant", lambda w: CHECK + ["--data", w.data(
        CHAT, {"messages": [{"role": "user", "content": "hi"}]})], "line 2: no assistant turn"),
    ("data-50-mb-line", lambda w: CHECK + ["--data", w.data(ALPACA, json.dumps({"text": "w" * 50_000_000}))],
     "line 2: 50,000,012 characters"),
    ("data-empty", lambda w: CHECK + ["--data", w.data()], "no record has text"),
    ("data-not-json", lambda w: CHECK + ["--data", w.data(ALPACA, "{oops")], "line 2: invalid JSON"),
    ("data-not-utf8", lambda w: CHECK + ["--data", w.file("latin1.jsonl", b'{"text": "caf\xe9"}')], "cannot read"),
    # --- where things are written
    ("rigplan-home-is-a-file", lambda w: CHECK + ["--home-file"], "is a file, not a directory"),
    ("plan-out-directory", lambda w: PLAN + ["--out", str(w.root)], "is a directory"),
    ("plan-out-parent-missing", lambda w: PLAN + ["--out", str(w.out / "plan.json")], "does not exist"),
    ("report-out-file", lambda w: ["report", "--out", w.file("report.png")], "is a file"),
    ("report-calibration-missing", lambda w: ["report", "--calibration", str(w.root / "none.json")], "not a file"),
    ("report-calibration-negative", lambda w: ["report", "--calibration", w.calibration(slack_ratio=-3.0),
                                               "--out", str(w.out)], "slack_ratio = -3.0"),
    ("report-calibration-nan", lambda w: ["report", "--calibration", w.calibration(mfu=float("nan")),
                                          "--out", str(w.out)], "mfu = nan"),
    ("calibrate-bad-method", lambda w: ["calibrate", "--methods", "lora,dora"], "--methods lora,dora"),
    ("calibrate-unknown-model", lambda w: ["calibrate", "--model", "lama-3.1-8b"], "did you mean"),
    # --- run: refused before any tokenizer or model loads
    ("run-gpt-oss-packed", lambda w: ["run", "gpt-oss-20b", "--data", w.good_data(), "--out", str(w.out),
                                      "--batching", "packed"], "gpt-oss-20b trains padded micro-batches only"),
    ("run-out-is-a-file", lambda w: ["run", "llama-3.2-1b", "--data", w.good_data(), "--out", w.file("o.txt")],
     "is a file"),
    ("run-rank-0", lambda w: run_(w, "--rank", "0"), "--rank 0"),
    ("run-rank-negative", lambda w: run_(w, "--rank", "-8"), "--rank -8"),
    ("run-micro-batch-0", lambda w: run_(w, "--micro-batch", "0"), "--micro-batch 0"),
    ("run-seq-negative", lambda w: run_(w, "--seq", "-5"), "--seq -5"),
    ("run-lr-negative", lambda w: run_(w, "--lr", "-1"), "--lr -1.0"),
    ("run-lr-nan", lambda w: run_(w, "--lr", "nan"), "--lr nan"),
    ("run-grad-accum-0", lambda w: run_(w, "--grad-accum", "0"), "--grad-accum 0"),
    ("run-eval-fraction-1.5", lambda w: run_(w, "--eval-fraction", "1.5"), "--eval-fraction 1.5"),
    ("run-eval-fraction-negative", lambda w: run_(w, "--eval-fraction", "-0.1"), "--eval-fraction -0.1"),
    ("run-epochs-0", lambda w: run_(w, "--epochs", "0"), "--epochs 0"),
    ("run-save-steps-negative", lambda w: run_(w, "--save-steps", "-1"), "--save-steps -1"),
    ("run-patience-negative", lambda w: run_(w, "--patience", "-1"), "--patience -1"),
    ("run-max-steps-0", lambda w: run_(w, "--max-steps", "0"), "--max-steps 0"),
    ("run-dry-run-rank-0", lambda w: run_(w, "--dry-run", "--rank", "0"), "--rank 0"),
    ("run-dry-run-micro-batch-negative", lambda w: run_(w, "--dry-run", "--micro-batch", "-2"), "--micro-batch -2"),
    ("run-everything-at-once", lambda w: run_(w, "--rank", "0", "--lr", "-1", "--eval-fraction", "1.5"),
     "--rank 0: pass a whole number >= 1; --lr -1.0: pass a finite number > 0; --eval-fraction 1.5"),
    ("run-data-missing", lambda w: ["run", "llama-3.2-1b", "--data", "/nonexistent.jsonl", "--out", str(w.out)],
     "--data /nonexistent.jsonl does not exist"),
    ("run-resume-without-checkpoint", lambda w: run_(w, "--resume"), "no checkpoint to resume from"),
    ("run-resume-and-overwrite", lambda w: run_(w, "--resume", "--overwrite"), "not both"),
    ("run-unknown-model", lambda w: ["run", "lama-3.2-1b", "--data", w.good_data(), "--out", str(w.out)],
     "did you mean"),
    ("run-bad-data", lambda w: ["run", "llama-3.2-1b", "--data", w.data(ALPACA, "{oops"), "--out", str(w.out)],
     "line 2: invalid JSON"),
    ("run-plan-with-epochs-0", lambda w: ["run", w.plan(epochs=0.0, rank=-1), "--data", w.good_data(),
                                          "--out", str(w.out)], "rank -1, epochs 0.0 out of range"),
    ("run-bert-directory", lambda w: ["run", w.config(**BERT_CONFIG), "--data", w.good_data(), "--out", str(w.out)],
     "BertForMaskedLM is not a causal language model"),
    ("run-corrupt-plan", lambda w: ["run", w.file("plan.json", '{"schema_version": 2, "model": 1}'),
                                    "--data", w.good_data(), "--out", str(w.out)], "not a plan this rigplan reads"),
    ("run-8-bit-adamw-sharded", lambda w: ["run", "llama-3.1-70b", "--data", w.good_data(), "--out", str(w.out),
                                           "--gpu", "rtx-a6000", "--gpus", "2", "--parallelism", "fsdp",
                                           "--method", "lora", "--optimizer", "adamw_8bit"],
     "--optimizer adamw_8bit cannot step FSDP"),
]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Workspace:
    w = Workspace(tmp_path)
    monkeypatch.setenv("RIGPLAN_HOME", str(w.home))
    return w


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _no_loading(monkeypatch) -> None:
    """Any tokenizer or model load in `run` fails the test: refusals come first."""
    def refuse(*_a, **_k):
        raise AssertionError("a tokenizer or model was loaded before the input was refused")

    from rigplan.trainer import engine

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)
    monkeypatch.setattr(engine, "load", refuse)


def assert_refused(result, message: str) -> None:
    out = result.output + (result.stderr or "")
    assert "Traceback" not in out and not (result.exception and not isinstance(result.exception, SystemExit)), \
        (out, result.exception)
    assert result.exit_code == 2, out
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rigplan: "), result.stderr
    assert message in lines[0], lines[0]
    assert any(a in lines[0] for a in ACTIONS), f"says no fix: {lines[0]}"


def test_at_least_40_bad_inputs() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(build, message, workspace, monkeypatch) -> None:
    args = build(workspace)
    if "--home-file" in args:  # RIGPLAN_HOME naming a file (which must be left as it is)
        args.remove("--home-file")
        monkeypatch.setenv("RIGPLAN_HOME", workspace.file("home-file"))
    if args[0] == "run":
        pytest.importorskip("torch")
        _no_loading(monkeypatch)
    if args[0] == "calibrate" and "--methods" not in args:
        monkeypatch.setattr("rigplan.profiles.nvml.local_gpus", lambda: ([], "no GPU in this test"))
    before = _snapshot(workspace.root)
    result = CliRunner().invoke(main, args)
    assert_refused(result, message)
    assert _snapshot(workspace.root) == before, "something was written"
    assert not workspace.home.exists() and not workspace.out.exists()


def test_a_resume_names_its_checkpoint_and_the_half_written_one_it_skips(workspace, monkeypatch) -> None:
    pytest.importorskip("torch")
    workspace.checkpoint(5, complete=True)
    workspace.checkpoint(7, complete=False)  # a kill -9 while transformers was writing it
    from rigplan.errors import RigplanError
    from rigplan.trainer import engine

    def stop(*_a, **_k):
        raise RigplanError("stopped here by the test")

    monkeypatch.setattr(engine, "count_tokens", stop)  # the message comes before any planning
    result = CliRunner().invoke(main, run_(workspace, "--resume"))
    assert result.exit_code == 2
    assert f"resuming from {workspace.out / 'checkpoints' / 'checkpoint-5'}; skipped " \
           f"{workspace.out / 'checkpoints' / 'checkpoint-7'}: half-written" in result.output


def test_ctrl_c_before_training_starts_exits_130(workspace, monkeypatch) -> None:
    pytest.importorskip("torch")
    from rigplan.trainer import engine

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "count_tokens", interrupted)  # Ctrl-C while the tokenizer loads
    result = CliRunner().invoke(main, run_(workspace))
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == ["rigplan: interrupted before training started; nothing was trained"]
    assert not workspace.out.exists()


def test_a_gpu_plan_on_a_machine_without_cuda_is_refused(workspace) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, ["run", workspace.plan(gpu="rtx-4090"), "--data", workspace.good_data(),
                                       "--out", str(workspace.out)])
    assert_refused(result, "this plan is for rtx-4090, but this machine has no CUDA GPU")
    assert not workspace.out.exists()


def test_qlora_on_a_machine_without_cuda_is_refused_before_the_data_is_tokenized(workspace, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from rigplan.trainer import run as runlib

    monkeypatch.setattr(runlib, "prepare_data", lambda *_a, **_k: pytest.fail("the data was tokenized first"))
    result = CliRunner().invoke(main, ["run", workspace.plan(method="qlora"), "--data", workspace.good_data(),
                                       "--out", str(workspace.out)])
    assert_refused(result, "QLoRA needs a CUDA GPU")


def test_weights_not_on_this_machine_fail_fast_offline(workspace, monkeypatch) -> None:
    """No weights here and no network (HF_HUB_OFFLINE): one line at once, not 52 s of retries."""
    pytest.importorskip("torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bogus = workspace.plan(model_path="rigplan-tests/no-such-model")
    result = CliRunner().invoke(main, ["run", bogus, "--data", workspace.good_data(), "--out", str(workspace.out)])
    assert_refused(result, "cannot download rigplan-tests/no-such-model")
    assert "pass a local directory" in result.stderr and not workspace.out.exists()

    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache("meta-llama/Llama-3.1-8B", "config.json"), str):
        return  # this machine has the weights: the run would start
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, ["run", "llama-3.1-8b", "--data", workspace.good_data(),
                                       "--out", str(workspace.out)])
    assert_refused(result, "cannot download meta-llama/Llama-3.1-8B")
    assert time.perf_counter() - t0 < 20 and not workspace.out.exists()


def test_a_calibration_with_impossible_values_is_not_planned_with(workspace) -> None:
    """A user's own calibration with a negative coefficient once gave "fits with 122.5 GiB to spare" on a
    23.9 GiB card: it is ignored with one warning line, and the reference is used (and said to be)."""
    workspace.home.mkdir()
    (workspace.home / "rtx-4090.json").write_text(Path(workspace.calibration(context_bytes=-2e11)).read_text())
    result = CliRunner().invoke(main, CHECK)
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"rigplan: ignoring {workspace.home / 'rtx-4090.json'}: impossible coefficients (context_bytes = "
        "-200000000000.0); run rigplan calibrate again (planning with the reference calibration meanwhile)"]
    assert "reference calibration" in result.output


# Run in a fresh interpreter where torch (or pandas) cannot be imported, as on `pip install -e .`.
BASE_INSTALL = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None
from rigplan.cli import main
sys.argv = ["rigplan", *{args!r}]
main()
"""


@pytest.mark.parametrize("hidden,args,message", [
    (("torch",), ["run", "llama-3.2-1b", "--data", "DATA", "--out", "OUT"], 'pip install -e ".[train]"'),
    (("pandas", "matplotlib"), ["report", "--out", "OUT"], 'pip install -e ".[report]"'),
], ids=["run-without-torch", "report-without-pandas"])
def test_base_install_says_which_extra_to_install(hidden, args, message, workspace) -> None:
    args = [str(workspace.out) if a == "OUT" else workspace.good_data() if a == "DATA" else a for a in args]
    code = BASE_INSTALL.format(hidden=hidden, args=args)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "RIGPLAN_HOME": str(workspace.home)}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr
    assert not workspace.out.exists() and not workspace.home.exists()
