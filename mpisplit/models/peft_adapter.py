"""LoRA adapters in Hugging Face PEFT's folder format, both ways.

    adapter/adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
                                        target_modules, lora_dropout, use_rslora, base model
    adapter/adapter_model.safetensors   base_model.model.<Hugging Face module>.lora_A.weight (r, in)
                                        and .lora_B.weight (out, r)

Ours are stored (in, r) and (r, out) under h.{i}.<attn|mlp>.<projection>.lora.a and .b, so each
is the transpose of PEFT's. `peft.PeftModel.from_pretrained(model, folder)` loads what
`write_adapter` writes; `read_adapter` reads a folder PEFT saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.models.hf_layout import hf_name
from mpisplit.nn.lora import TARGETS, LoraConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def peft_name(name: str) -> str:
    """h.0.attn.q_proj.lora.a -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    module, leaf = name.split(".lora.")
    base = hf_name(f"{module}.weight")[0].removesuffix(".weight")
    return f"base_model.model.{base}.lora_{leaf.upper()}.weight"


def write_adapter(folder: str | os.PathLike, arrays: dict[str, np.ndarray], config: LoraConfig,
                  base_model: str | None) -> Path:
    """Write `arrays` (our names, full arrays) as a PEFT adapter folder, replacing any there."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {peft_name(n): np.ascontiguousarray(a.T) for n, a in sorted(arrays.items())}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "target_modules": list(config.targets), "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model,
    }
    (tmp / CONFIG).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(its LoraConfig, full arrays under our names) of a PEFT LoRA folder; ValueError naming what
    this library cannot take (another PEFT method, biases, a module it does not adapt)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS}")
    from safetensors.numpy import load_file

    arrays = {}
    for key, value in load_file(str(weights)).items():
        arrays[_our_name(key, folder)] = np.asarray(value).T
    return config, arrays


def read_adapter_config(folder: Path) -> LoraConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter folder: it has no {CONFIG}")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise ValueError(f"{str(path)!r}: peft_type {data.get('peft_type') if isinstance(data, dict) else None!r}; "
                         "only LORA adapters can be read")
    if data.get("bias", "none") != "none" or data.get("fan_in_fan_out"):
        raise ValueError(f"{str(path)!r}: bias {data.get('bias')!r} / fan_in_fan_out: only bias 'none' adapters")
    targets = data.get("target_modules")
    names = set(TARGETS) if targets == "all-linear" else {str(t).rsplit(".", 1)[-1] for t in targets or []}
    config = LoraConfig(rank=int(data.get("r", 0)), alpha=float(data.get("lora_alpha", 0)),
                        targets=tuple(t for t in TARGETS if t in names) + tuple(sorted(names - set(TARGETS))),
                        dropout=float(data.get("lora_dropout") or 0.0), rslora=bool(data.get("use_rslora", False)))
    try:
        config.validate()
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None
    return config


def _our_name(key: str, folder: Path) -> str:
    found = _PEFT.match(key)
    if found is None:
        raise ValueError(f"{str(folder / WEIGHTS)!r}: tensor {key!r} is not a LoRA factor of a projection")
    module, leaf = found.groups()
    layer = re.match(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", module)
    if layer is None or layer.group(3) not in TARGETS:
        raise ValueError(f"{str(folder / WEIGHTS)!r}: tensor {key!r} adapts {module}, not one of the projections "
                         f"{', '.join(TARGETS)}")
    part = "attn" if layer.group(2) == "self_attn" else "mlp"
    return f"h.{layer.group(1)}.{part}.{layer.group(3)}.lora.{leaf.lower()}"


def export_checkpoint_adapter(step_folder: str | os.PathLike, config: LoraConfig, base_model: str | None) -> Path:
    """Write `step_folder`/adapter from the adapters of a checkpoint (read whole from its shards,
    whatever the layout that wrote them)."""
    from mpisplit.training.checkpoint import CheckpointReader

    reader = CheckpointReader(step_folder)
    try:
        arrays = {n.removeprefix("model/"): reader.read(n) for n in reader.names()
                  if n.startswith("model/") and ".lora." in n}
    finally:
        reader.close()
    return write_adapter(Path(step_folder) / "adapter", arrays, config, base_model)
