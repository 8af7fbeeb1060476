"""LoRA fine-tuning of a GPT: adapters on the named projections of every block, the rest frozen.

    apply_lora(model, LoraConfig(rank=8, alpha=16, targets=TARGETS), seed)

Each target projection of each block (Hugging Face names: q_proj, k_proj, v_proj, o_proj of the
attention, gate_proj, up_proj, down_proj of the MLP) gets a LoRA module (nn/lora.py) as its
`lora`, separate per projection whatever the fusion of their products; every other parameter is
frozen (requires_grad false: no gradient, no optimizer state). A is drawn as PEFT draws it
(uniform in +-1/sqrt(in)) from the seed and the parameter's name, the same global values at any
layout; B starts at zero, so the adapted model starts equal to the base.
"""

from __future__ import annotations

from typing import Any

from mpisplit.nn.linear import RowParallelLinear
from mpisplit.nn.lora import LoRA, LoraConfig
from mpisplit.nn.module import global_init
from mpisplit.runtime.backend import get_array_module


def apply_lora(model: Any, config: LoraConfig, seed: int) -> list[Any]:
    """Attach the adapters to `model` (a GPT, or one pipeline stage of it), freeze the rest;
    returns the adapters' parameters."""
    config.validate()
    if model.config.positions == "learned":
        raise ValueError("LoRA adapts the Llama family's projections (q_proj ... down_proj); this is a GPT-2 model")
    for p in model.parameters():
        p.requires_grad = False
    for block in model.h:
        for name in config.targets:
            parent = block.attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp
            layer = getattr(parent, name)
            layer.lora = LoRA(layer.weight, row=isinstance(layer, RowParallelLinear), config=config)
    adapters = []
    for name, p in model.named_parameters():
        if ".lora." in name:
            xp = get_array_module(p.data)
            p.data[...] = xp.asarray(p.slab_of(global_init(p, name, seed)), dtype=p.dtype)
            adapters.append(p)
    return adapters


def lora_partial_params(model: Any) -> list[Any]:
    """The adapters' replicated factors, whose gradients are partial on each TP rank."""
    return [m.partial for m in model.modules() if isinstance(m, LoRA)]


def load_adapter(model: Any, arrays: dict[str, Any], source: str) -> None:
    """Every adapter of `model` from the full arrays (our names) of `source`; its blocks only
    (a pipeline stage takes its own), and every one of them must be there with its shape."""
    for name, p in model.named_parameters():
        if ".lora." not in name:
            continue
        if name not in arrays:
            raise ValueError(f"{source!r} has no adapter for {name} (it adapts {len(arrays)} tensors)")
        if tuple(arrays[name].shape) != p.global_shape:
            raise ValueError(f"{source!r}: {name} has shape {tuple(arrays[name].shape)}, the model needs "
                             f"{p.global_shape}")
        xp = get_array_module(p.data)
        p.data[...] = xp.asarray(p.slab_of(arrays[name]), dtype=p.dtype)
