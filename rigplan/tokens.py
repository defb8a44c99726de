"""Token counts with the model's own tokenizer, without torch or transformers: `rigplan check --data` counts
exactly wherever the model's tokenizer.json is on disk (a local model directory, or the Hugging Face cache),
through the `tokenizers` library and the chat template rendered with jinja2 as transformers renders it.

Both packages are optional (they come with `.[train]`); without them, or without the files, the caller estimates
lengths from characters. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rigplan import data


def tokenizer_dir(model_path: str) -> Path | None:
    """Where the model's tokenizer.json lies on this machine: a local directory, else the newest snapshot of a
    hub id in the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub); else None."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local if (local / "tokenizer.json").is_file() else None
    if "/" not in model_path:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" /
                                                     "huggingface") / "hub")
    snapshots = hub / f"models--{model_path.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/tokenizer.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1].parent if found else None


class LightTokenizer:
    """The part of a transformers tokenizer that rigplan.data.tokenize uses, over the tokenizers library and
    jinja2: encoding with or without special tokens, the chat template, and the EOS token."""

    def __init__(self, folder: Path) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
        self.special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
                        if k.endswith("_token") and v}
        self.eos_token_id = self.backend.token_to_id(self.special["eos_token"]) if "eos_token" in self.special else None
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():  # transformers 5 saves it beside the config
            template = (folder / "chat_template.jinja").read_text()
        self.chat_template = template
        # As transformers compiles chat templates (its chat_template_utils: a sandbox, trim_blocks, lstrip_blocks,
        # loop controls, raise_exception).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        self._env = env

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        return self._env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special)


def counted_lengths(model_path: str, data_file: Path, skip_bad: bool = False) -> tuple[list[int], int] | None:
    """The data's tokens per example (a sample, as rigplan.data.token_lengths counts them: template and EOS
    included) with the model's tokenizer when its files are on this machine and the tokenizers and jinja2
    packages are installed; else None (lengths are then estimated from characters)."""
    folder = tokenizer_dir(model_path)
    if folder is None:
        return None
    try:
        tokenizer: Any = LightTokenizer(folder)
    except ImportError:  # a base install: no tokenizers or jinja2
        return None
    except (OSError, ValueError, KeyError):  # files it cannot read: estimate instead
        return None
    return data.token_lengths(Path(data_file), tokenizer, skip_bad=skip_bad)
