"""A reduced-depth checkpoint made full depth by repeating its decoder layers: layer j holds layer j mod L's
tensors, config.json's num_hidden_layers is the new depth. For the runs that need the depth (memory and speed, which
do not depend on the weights' values) where the disk cannot hold the 16-bit model to quantize: Llama-3.1-70B at 80
layers is 131 GiB in bf16 against the two-H200 machine's 128 GiB disk, about 37 GiB in bitsandbytes 4-bit.

    python3 bench/deepen.py SRC DST DEPTH      (e.g. the 8-layer -bnb-4bit replica of bench/record_fsdp.sh to 80)

Any safetensors checkpoint: a bitsandbytes 4-bit one keeps each weight's quant-state tensors under its layer's keys
(`model.layers.3.mlp.down_proj.weight.absmax` ...), which are renamed with it. Written in shards of about 4 GiB with
the index transformers reads; every file beside the weights (tokenizer, generation config) is copied.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

LAYER_KEY = re.compile(r"^(.*\blayers\.)(\d+)(\..+)$")
SHARD_BYTES = 4 * 2**30


def deepen(src: Path, dst: Path, depth: int) -> dict[str, int]:
    """Write DST, SRC's checkpoint at `depth` layers; returns the tensors and bytes written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    layers = config["num_hidden_layers"]
    per_layer: dict[int, dict[str, object]] = {}
    rest: dict[str, object] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                m = LAYER_KEY.match(key)
                if m:
                    per_layer.setdefault(int(m[2]), {})[m[1] + "{}" + m[3]] = h.get_tensor(key)
                else:
                    rest[key] = h.get_tensor(key)
    if sorted(per_layer) != list(range(layers)):
        raise SystemExit(f"{src}: tensors for layers {sorted(per_layer)}, config.json says {layers}")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shards: list[dict[str, object]] = [dict(rest)]
    size = sum(t.numel() * t.element_size() for t in rest.values())  # type: ignore[attr-defined]
    for j in range(depth):
        layer = {name.format(j): t.clone() for name, t in per_layer[j % layers].items()}  # type: ignore[attr-defined]
        layer_bytes = sum(t.numel() * t.element_size() for t in layer.values())
        if size + layer_bytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1].update(layer)
        size += layer_bytes
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})  # type: ignore[arg-type]
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())  # type: ignore[attr-defined]
        shard.clear()
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config["num_hidden_layers"] = depth
    if isinstance(config.get("layer_types"), list):  # per-layer kinds (sliding or full attention), repeated alike
        config["layer_types"] = [config["layer_types"][j % layers] for j in range(depth)]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    return {"tensors": len(weight_map), "bytes": total}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(json.dumps(deepen(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
