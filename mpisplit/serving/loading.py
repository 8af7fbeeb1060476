"""A model, its tokenizer and its end-of-sequence ids from an mpisplit checkpoint, a Hugging
Face folder (GPT-2 or Llama family) or a GGUF file.

The eos ids: a folder's come from its config.json and generation_config.json, a GGUF file's
from its metadata (`models.hf_eos.eos_token_ids`); a checkpoint's from its meta
"eos_token_ids" (written by `mpisplit convert --from-hf` from the folder's), else none: a
character-level checkpoint has no end-of-sequence token and generates to max_tokens.
"""

from __future__ import annotations

import sys
from typing import Any

from mpisplit import kernels
from mpisplit.models import GPT, GPTConfig
from mpisplit.models.gpt import check_eos_ids
from mpisplit.models.hf import is_gguf, load_tokenizer, read_config
from mpisplit.models.hf_eos import eos_token_ids
from mpisplit.models.lora import apply_lora, merge_lora
from mpisplit.models.quantize import check_kind, quantize_model
from mpisplit.nn.lora import LoraConfig
from mpisplit.runtime.errors import agree
from mpisplit.training.checkpoint import CheckpointReader
from mpisplit.training.data import CharTokenizer
from mpisplit.training.state import load_model, resolve_checkpoint


def load_model_and_tokenizer(grid: Any, *, ckpt: str | None = None, hf: str | None = None,
                             dtype: str = "float32", max_model_len: int | None = None,
                             gguf: str | None = None, quantized: bool = False,
                             quantize: str | None = None) -> tuple[GPT, Any, tuple[int, ...]]:
    """(model, tokenizer or None, eos ids) on every rank; each rank reads only its slabs, and
    hashes the checkpoint files it reads before using them. Collective. A checkpoint's
    tokenizer is its character vocabulary; a folder's is tokenizer.json or vocab.json +
    merges.txt (None without them: token ids only); `hf` may also be a GGUF file.
    `max_model_len` caps the context of a rotary model (the Llama family declares 8k-128k
    positions). `quantized`: a GGUF file's matrices stay in its blocks where a kernel takes them
    (nn/quantized.py; model.quantized_report lists the others). `quantize` ("q8_0", "q4_0"): a
    checkpoint's or folder's matrices quantized into such blocks once loaded (models/quantize.py)."""
    if (ckpt is None) + (hf is None) + (gguf is None) != 2:
        raise ValueError("give exactly one of ckpt, hf and gguf")
    with agree(grid.world):
        _check_quantize(quantize, gguf or hf, quantized)
    model, tokenizer, eos = _load(grid, ckpt, hf, dtype, max_model_len, gguf, quantized)
    if quantize is not None:
        with agree(grid.world):
            model.quantized_report = quantize_model(model, quantize)  # type: ignore[attr-defined]
    return model, tokenizer, eos


def _check_quantize(quantize: str | None, source: str | None, quantized: bool) -> None:
    if quantize is None:
        return
    check_kind(quantize)
    if quantized or (source is not None and is_gguf(source)):
        raise ValueError("--quantize is for --hf folders and --ckpt checkpoints: a GGUF file's own blocks "
                         "are kept as they are")
    if not kernels.enabled():
        raise ValueError("--quantize needs the block kernels: pip install 'mpisplit[fast]' (numba)")


def _load(grid: Any, ckpt: str | None, hf: str | None, dtype: str, max_model_len: int | None,
          gguf: str | None, quantized: bool) -> tuple[GPT, Any, tuple[int, ...]]:
    """load_model_and_tokenizer less --quantize."""
    if gguf is not None:
        if not is_gguf(gguf):
            raise ValueError(f"--gguf takes a .gguf file, got {gguf!r}")
        hf = gguf  # read as the Llama-family folder it converts to
    if ckpt is not None:
        with agree(grid.world):
            path = resolve_checkpoint(ckpt)
        reader = CheckpointReader(path, grid.world)
        with agree(grid.world):
            cfg = GPTConfig(**reader.meta["config"])
            cfg.block_size = capped_context(cfg, max_model_len)
            cfg.validate(grid.tp)
            chars = reader.meta.get("tokenizer")
            tokenizer = CharTokenizer(chars) if chars else None
            eos = tuple(int(i) for i in check_eos_ids(reader.meta.get("eos_token_ids", ()), cfg.vocab_size))
            lora = reader.meta.get("lora")
        model = GPT(cfg, grid, dtype=dtype, init=False)
        if lora is not None:  # a LoRA run's checkpoint: served with its adapters merged
            apply_lora(model, LoraConfig.from_meta(lora), seed=0)
        load_model(reader, model)
        reader.close()
        if lora is not None:
            merge_lora(model)
        return model, tokenizer, eos
    assert hf is not None  # exactly one of ckpt, hf and gguf, checked above
    with agree(grid.world):
        cfg = read_config(hf)
        options: dict[str, Any] = {"max_model_len": max_model_len} if cfg.positions == "rotary" else {}
        if quantized:
            if not is_gguf(hf):
                raise ValueError("quantized blocks are kept for --gguf files only")
            if not kernels.enabled():
                raise ValueError("keeping quantized blocks needs the block kernels: pip install 'mpisplit[fast]' (numba)")
            options["keep_quantized"] = True
        capped_context(cfg, max_model_len)
    model = GPT.from_pretrained(hf, grid, dtype=dtype, **options)
    with agree(grid.world):
        tokenizer = load_tokenizer(hf, model.config.vocab_size)
        eos = tuple(int(i) for i in check_eos_ids(eos_token_ids(hf), model.config.vocab_size))
    return model, tokenizer, eos


def capped_context(cfg: GPTConfig, max_model_len: int | None) -> int:
    """The context the model is run with: block_size, or less with max_model_len (rotary models
    only: a learned position table's length is part of the weights)."""
    if max_model_len is None:
        return cfg.block_size
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len <= 0:
        raise ValueError(f"--max-model-len must be a positive integer, got {max_model_len!r}")
    if cfg.positions != "rotary":
        if max_model_len < cfg.block_size:
            raise ValueError(f"--max-model-len applies to rotary (Llama-family) models; this one has "
                             f"{cfg.block_size} learned positions")
        return cfg.block_size
    return min(cfg.block_size, max_model_len)


def keep_gguf_blocks(args: Any, rank: int, prog: str) -> bool:
    """Whether a --gguf file's matrices stay in their blocks: on the CPU with the block kernels,
    unless --dequantize; rank 0 says why when they cannot."""
    if getattr(args, "gguf", None) is None or getattr(args, "dequantize", True):
        return False
    why = ("its block kernels run on the CPU" if getattr(args, "device", "cpu") == "gpu" else
           None if kernels.enabled() else "the block kernels are off: numba is not installed (pip install "
           "'mpisplit[fast]') or MPISPLIT_KERNELS=numpy")
    if why is not None and rank == 0:
        print(f"{prog}: the GGUF file's matrices are dequantized to {args.dtype} ({why})", flush=True)
    return why is None


def report_blocks(model: Any, prog: str, dtype: str, quantize: str | None = None, file: Any = None) -> None:
    """Rank 0's line on what stayed in (or was quantized to) blocks and what was dequantized."""
    report = getattr(model, "quantized_report", None)
    if report is None or model.grid.world.rank != 0:
        return
    left = report["dequantized"]
    how = f"quantized to {quantize.upper()} blocks" if quantize else "kept in their GGUF blocks"
    print(f"{prog}: {len(report['kept'])} matrices {how} ({report['bytes'] / 2**20:.1f} MiB on rank 0)"
          + (f"; dequantized to {dtype}: {', '.join(left)}" if left else ""), file=file, flush=True)


def load_on_ranks(world: Any, args: Any, prog: str | None = None) -> tuple[Any, GPT, Any, tuple[int, ...]]:
    """(grid, model, tokenizer, eos ids) for a command's --tp, --ckpt/--hf/--gguf, --dtype and
    --max-model-len: the TP degree checked on every rank alike, BLAS threads limited, the grid
    made, the model loaded (a GGUF file's blocks kept where the command has --dequantize and it
    is not given: `prog` names the command in the message saying why they cannot be). Collective
    over `world`."""
    from mpisplit.parallel.grid import ProcessGrid
    from mpisplit.runtime.backend import limit_blas_threads

    with agree(world):
        tp = world.Get_size() if args.tp is None else args.tp
        if tp <= 0 or world.Get_size() % tp:
            raise ValueError(f"--tp {tp} does not divide the world size {world.Get_size()}")
    limit_blas_threads(world)
    grid = ProcessGrid(tp=tp)
    model, tokenizer, eos = load_model_and_tokenizer(
        grid, ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, dtype=args.dtype, max_model_len=args.max_model_len,
        quantized=keep_gguf_blocks(args, world.Get_rank(), prog or "mpisplit"))
    report_blocks(model, prog or "mpisplit", args.dtype, file=sys.stderr)  # stdout: the command's answers
    return grid, model, tokenizer, eos
