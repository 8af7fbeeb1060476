"""The Hugging Face tensor names of the Llama family, as data: one table for Llama, Qwen2 and
Mistral (they share the layout; what differs is in their config.json, read by hf_llama_config.py).

    mpisplit name                  Hugging Face name                                   file shape
    wte.weight                     model.embed_tokens.weight                           (V, h)
    h.{i}.ln_1.weight              model.layers.{i}.input_layernorm.weight             (h,)
    h.{i}.attn.q_proj.weight       model.layers.{i}.self_attn.q_proj.weight            (H*d, h)    transposed
    h.{i}.attn.k_proj.weight       model.layers.{i}.self_attn.k_proj.weight            (KV*d, h)   transposed
    h.{i}.attn.v_proj.weight       model.layers.{i}.self_attn.v_proj.weight            (KV*d, h)   transposed
    h.{i}.attn.o_proj.weight       model.layers.{i}.self_attn.o_proj.weight            (h, H*d)    transposed
    h.{i}.ln_2.weight              model.layers.{i}.post_attention_layernorm.weight    (h,)
    h.{i}.mlp.gate_proj.weight     model.layers.{i}.mlp.gate_proj.weight               (I, h)      transposed
    h.{i}.mlp.up_proj.weight       model.layers.{i}.mlp.up_proj.weight                 (I, h)      transposed
    h.{i}.mlp.down_proj.weight     model.layers.{i}.mlp.down_proj.weight               (h, I)      transposed
    ln_f.weight                    model.norm.weight                                   (h,)
    lm_head.weight                 lm_head.weight (absent when tied)                   (V, h)

Biases (.bias, when the config has them) keep the weight's name with "bias" and are never
transposed. Linear weights are (out, in) in the files and (in, out) here, hence "transposed":
a column split here (our axis 1) is a row slice of the file, so each rank reads only its rows.
"""

from __future__ import annotations

import re

# mpisplit name (with {i} for the block) -> Hugging Face name; transposed: (out, in) in the file
LLAMA_NAMES = {
    "wte": "model.embed_tokens",
    "h.{i}.ln_1": "model.layers.{i}.input_layernorm",
    "h.{i}.attn.q_proj": "model.layers.{i}.self_attn.q_proj",
    "h.{i}.attn.k_proj": "model.layers.{i}.self_attn.k_proj",
    "h.{i}.attn.v_proj": "model.layers.{i}.self_attn.v_proj",
    "h.{i}.attn.o_proj": "model.layers.{i}.self_attn.o_proj",
    "h.{i}.ln_2": "model.layers.{i}.post_attention_layernorm",
    "h.{i}.mlp.gate_proj": "model.layers.{i}.mlp.gate_proj",
    "h.{i}.mlp.up_proj": "model.layers.{i}.mlp.up_proj",
    "h.{i}.mlp.down_proj": "model.layers.{i}.mlp.down_proj",
    "ln_f": "model.norm",
    "lm_head": "lm_head",
}
TRANSPOSED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_BLOCK = re.compile(r"^h\.(\d+)\.(.*)$")


def hf_name(name: str) -> tuple[str, bool]:
    """(Hugging Face name, transposed) of an mpisplit parameter name; KeyError if it has none."""
    module, leaf = name.rsplit(".", 1)
    m = _BLOCK.match(module)
    key, block = (f"h.{{i}}.{m.group(2)}", m.group(1)) if m else (module, None)
    pattern = LLAMA_NAMES[key]
    out = pattern.format(i=block) if block is not None else pattern
    return f"{out}.{leaf}", leaf == "weight" and module.rsplit(".", 1)[-1] in TRANSPOSED
