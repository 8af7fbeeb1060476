"""LoRA fine-tuning of a GPT: adapters on the named projections of every block, the rest frozen.

    apply_lora(model, LoraConfig(rank=8, alpha=16, targets=TARGETS), seed)
    merge_lora(model)          # W += s A B in every adapted projection; the adapters removed

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
from mpisplit.nn.lora import TARGETS, AdapterSet, LoRA, LoraConfig, RowAdapters
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
    for _, layer in _targets(model, config.targets):
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
    for prefix, layer in _targets(model, TARGETS):
        if isinstance(layer.lora, LoRA):
            _load_factors(layer.lora, prefix, arrays, source)


def merge_lora(model: Any) -> None:
    """Fold every adapter into its projection's slab (W += s A B: a column layer's A is whole and
    B this rank's columns, a row layer's A this rank's rows and B whole, so the product is this
    rank's slab of the global s A B) and remove the adapters; every weight is trainable again."""
    for layer in [m for m in model.modules() if isinstance(getattr(m, "lora", None), LoRA)]:
        lora = layer.lora
        xp = get_array_module(layer.weight.data)
        delta = (lora.a.data.astype(xp.float64) * lora.scale) @ lora.b.data.astype(xp.float64)
        layer.weight.data[...] = (layer.weight.data.astype(xp.float64) + delta).astype(layer.weight.dtype)
        layer.lora = None
    for p in model.parameters():
        p.requires_grad = True


def attach_served_adapters(model: Any, adapters: list[tuple[LoraConfig, dict[str, Any], str]]) -> RowAdapters:
    """Give every projection that any of `adapters` (config, full arrays under our names,
    source) adapts an AdapterSet holding adapter k + 1's slabs; returns the RowAdapters that the
    batched forward sets for each pass (models without it serve the base model only)."""
    rows = RowAdapters()
    sets: dict[int, tuple[Any, dict[int, tuple[Any, Any, float]]]] = {}
    for k, (config, arrays, source) in enumerate(adapters, start=1):
        config.validate()
        for prefix, layer in _targets(model, config.targets):
            lora = LoRA(layer.weight, row=isinstance(layer, RowParallelLinear), config=config)
            _load_factors(lora, prefix, arrays, source)
            sets.setdefault(id(layer), (layer, {}))[1][k] = (lora.a.data, lora.b.data, lora.scale)
    for layer, factors in sets.values():
        layer.lora = AdapterSet(rows, factors)
    model.served_adapters = rows
    return rows


def _targets(model: Any, targets: tuple[str, ...]) -> Any:
    """(parameter-name prefix, layer) of every target projection of this stage's blocks."""
    for i, block in model.h.blocks.items():
        for name in targets:
            part = "attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            yield f"h.{i}.{part}.{name}", getattr(getattr(block, part), name)


def _load_factors(lora: LoRA, prefix: str, arrays: dict[str, Any], source: str) -> None:
    for leaf, p in (("a", lora.a), ("b", lora.b)):
        name = f"{prefix}.lora.{leaf}"
        if name not in arrays:
            raise ValueError(f"{source!r} has no adapter for {name} (it adapts {len(arrays)} tensors)")
        if tuple(arrays[name].shape) != p.global_shape:
            raise ValueError(f"{source!r}: {name} has shape {tuple(arrays[name].shape)}, the model needs "
                             f"{p.global_shape}")
        xp = get_array_module(p.data)
        p.data[...] = xp.asarray(p.slab_of(arrays[name]), dtype=p.dtype)
