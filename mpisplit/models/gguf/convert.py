"""A GGUF file as a Hugging Face folder transformers loads as it is:

    convert_to_hf("model.gguf", "out")
    out/config.json  generation_config.json  tokenizer.json  tokenizer_config.json
        model.safetensors   every tensor dequantized to float32, Hugging Face names and layout

Everything is checked before anything is written (architecture, tensors, types, tokenizer); the
folder is written under a temporary name beside `out` and renamed into place at the end, so a
failure leaves no half-written folder. model.safetensors is streamed one tensor at a time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from pathlib import Path

import numpy as np

from mpisplit.models.gguf.config import generation_config
from mpisplit.models.gguf.tokenizer import build_tokenizer, save_tokenizer
from mpisplit.models.gguf.weights import GGUFWeights
from mpisplit.runtime.files import fsync_dir, fsync_file


def _safetensors_order(names: set[str]) -> list[str]:
    def key(name: str) -> tuple:
        parts = name.split(".")
        return (0, int(parts[2]), name) if parts[1:2] == ["layers"] else (1, 0, name)
    return sorted(names, key=key)


def write_safetensors(weights: GGUFWeights, path: Path, progress: bool = True) -> None:
    """All tensors of `weights` as float32 in one safetensors file, one tensor in memory at a time."""
    from tqdm import tqdm

    names = _safetensors_order(weights.names())
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name in names:
        nbytes = 4 * int(np.prod(weights.shape(name), dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(weights.shape(name)), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in tqdm(names, desc="dequantizing", unit="tensor", disable=not progress):
            out.write(np.ascontiguousarray(weights.read(name, None), dtype="<f4").tobytes())
    fsync_file(path)


def convert_to_hf(path: str | os.PathLike, out_folder: str | os.PathLike, progress: bool = True) -> None:
    """Write the Hugging Face folder of GGUF file `path` to `out_folder` (which must not exist)."""
    out = Path(out_folder)
    if out.exists():
        raise ValueError(f"output folder {str(out)!r} already exists; choose a new one")
    weights = GGUFWeights(path)
    try:
        for name in sorted(weights.names()):
            weights.check_float(name)
        tokenizer, tokenizer_config = build_tokenizer(weights.file)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            texts = {"config.json": weights.config, "generation_config.json": generation_config(weights.file)}
            for file, content in texts.items():
                (tmp / file).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
            save_tokenizer(tokenizer, tokenizer_config, tmp)
            write_safetensors(weights, tmp / "model.safetensors", progress)
            fsync_dir(tmp)
            os.rename(tmp, out)
            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        weights.close()
