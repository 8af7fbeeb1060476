"""Convert between mpisplit checkpoints, Hugging Face folders (GPT-2, Llama, Qwen2, Mistral) and GGUF files.

    mpirun -n 2 mpisplit convert --to-hf out/run1 gpt2-export
    mpirun -n 4 mpisplit convert --from-hf gpt2-folder ckpt-root --step 0
    mpisplit convert --to-hf out/run1/step-00000600 gpt2-export --dtype float32
    mpirun -n 1 mpisplit convert --from-gguf model.gguf llama-folder
    mpisplit convert --to-gguf llama-folder model.gguf --type q8_0
    mpirun -n 2 mpisplit convert --to-gguf out/run1 model.gguf --tokenizer llama-folder
    mpirun -n 2 mpisplit convert --merge-lora llama-folder out/step-00000600/adapter merged-folder

--to-hf reads an mpisplit checkpoint (a run folder's latest step, or one step folder; saved at
any TP degree) and writes config.json + model.safetensors in the Hugging Face layout of its family;
a LoRA run's checkpoint is written with its adapters merged into the weights (W + s A B).
--merge-lora reads a Hugging Face folder and a PEFT LoRA adapter folder (one a LoRA run saved in
its checkpoints, or one PEFT saved) and writes the folder's model with the adapter merged.
--from-hf reads such a folder and writes an mpisplit checkpoint OUT_ROOT/step-XXXXXXXX (model
weights and config; no tokenizer, no optimizer state); other checkpoints under OUT_ROOT are kept.
--from-gguf reads a llama.cpp GGUF file (Llama or Qwen2) and writes a new Hugging Face folder
(config.json, generation_config.json, model.safetensors in float32, tokenizer.json,
tokenizer_config.json with the chat template); rank 0 writes it.
--to-gguf writes one GGUF file that llama.cpp (and Ollama, LM Studio) load, from a Hugging Face
folder (Llama, Mistral and Qwen2 as llama.cpp's "llama" and "qwen2"; GPT-2 as "gpt2") or from an
mpisplit checkpoint of one (first written as a Hugging Face folder in a temporary folder beside
OUT, by all ranks as --to-hf does). --type f32, f16 (the default), q8_0 or q4_0: matrices in that
type (q8_0/q4_0: gguf.quants' blocks of 32 along the input dimension; a matrix whose input
dimension 32 does not divide is written f16), norms and biases float32. The tokenizer is the
folder's tokenizer.json (a byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM) with its chat template,
or --tokenizer FOLDER's; a checkpoint takes the one of the folder it was converted or fine-tuned
from when that folder still exists. Rank 0 writes the file.

Any world size works: each rank holds only its slabs. The TP degree is the largest one that
divides both the world size and n_head unless --tp is given; the remaining ranks form data-parallel
replicas that read but do not write. Rank 0 prints a summary.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

USER_ERRORS = (ValueError, TypeError, OSError)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    from mpisplit.models.gguf.writer import TYPES as GGUF_TYPES

    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument(
        "--to-hf", nargs=2, metavar=("CKPT", "OUT_FOLDER"),
        help="mpisplit checkpoint (run folder or step folder) -> Hugging Face folder",
    )
    way.add_argument(
        "--from-hf", nargs=2, metavar=("HF_FOLDER", "OUT_ROOT"),
        help="Hugging Face folder (GPT-2 or Llama family) -> mpisplit checkpoint under OUT_ROOT",
    )
    way.add_argument(
        "--merge-lora", nargs=3, metavar=("HF_FOLDER", "ADAPTER", "OUT_FOLDER"),
        help="Hugging Face folder + PEFT LoRA adapter folder -> Hugging Face folder with the adapter merged",
    )
    way.add_argument(
        "--from-gguf", nargs=2, metavar=("GGUF_FILE", "OUT_FOLDER"),
        help="llama.cpp GGUF file (Llama, Qwen2) -> new Hugging Face folder, weights dequantized to float32",
    )
    way.add_argument(
        "--to-gguf", nargs=2, metavar=("SRC", "OUT_GGUF"),
        help="Hugging Face folder or mpisplit checkpoint (Llama family, GPT-2) -> GGUF file for llama.cpp",
    )
    p.add_argument("--type", choices=list(GGUF_TYPES), default=None,
                   help="type of the GGUF file's matrices (--to-gguf; default f16)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="folder whose tokenizer.json and tokenizer_config.json go into the GGUF file (--to-gguf)")
    p.add_argument("--step", type=int, default=0, help="step number of the written checkpoint (--from-hf)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: see above)")
    p.add_argument(
        "--dtype", choices=["float32", "float64"], default=None,
        help="dtype of the written weights (default: the source's; float16/bfloat16 become float32)",
    )
    args = p.parse_args(argv)
    if args.from_gguf and (args.tp is not None or args.dtype not in (None, "float32") or args.step):
        p.error("--from-gguf writes float32 weights from rank 0: --tp, --dtype and --step do not apply")
    if args.to_gguf and (args.dtype is not None or args.step):
        p.error("--to-gguf writes the matrices in --type: --dtype and --step do not apply")
    if not args.to_gguf and (args.type is not None or args.tokenizer is not None):
        p.error("--type and --tokenizer apply to --to-gguf only")
    return args


def choose_tp(requested: int | None, world_size: int, n_head: int) -> int:
    """--tp if given (it must divide the world size), else gcd(world size, n_head)."""
    if requested is None:
        return math.gcd(world_size, n_head)
    if requested <= 0 or world_size % requested:
        raise ValueError(f"--tp {requested} does not divide the world size {world_size}")
    return requested


def to_hf(ckpt: str, out: str, tp: int | None, dtype: str | None, world: Any) -> str:
    import mpisplit as ms
    from mpisplit.models.lora import apply_lora, merge_lora
    from mpisplit.nn.lora import LoraConfig
    from mpisplit.runtime.errors import agree
    from mpisplit.training.checkpoint import CheckpointReader
    from mpisplit.training.state import load_model, resolve_checkpoint

    with agree(world):
        path = resolve_checkpoint(ckpt)
    reader = CheckpointReader(path, world)
    with agree(world):
        if not isinstance(reader.meta.get("config"), dict) or "model/wte.weight" not in reader.names():
            raise ValueError(f"{path} is not a GPT checkpoint (no meta config or no model/wte.weight)")
        cfg = ms.GPTConfig(**reader.meta["config"])
        tp = choose_tp(tp, world.Get_size(), cfg.n_head)
        cfg.validate(tp)
        stored = reader.dtype("model/wte.weight").name
        dtype = dtype or (stored if stored in ("float32", "float64") else "float32")
        lora = reader.meta.get("lora")
    grid = ms.ProcessGrid(tp=tp, comm=world)
    model = ms.GPT(cfg, grid, dtype=dtype, init=False)
    if lora is not None:  # a LoRA run: its adapters, then merged
        apply_lora(model, LoraConfig.from_meta(lora), seed=0)
    load_model(reader, model)
    reader.close()
    if lora is not None:
        merge_lora(model)
    model.save_pretrained(out)
    grid.free()
    return (
        f"wrote {out} (config.json, model.safetensors) from {path}: {model.num_parameters():,} parameters, "
        f"{dtype}, tp={tp}{', LoRA adapters merged' if lora is not None else ''}"
    )


def merge_adapter(hf_folder: str, adapter: str, out: str, tp: int | None, dtype: str | None, world: Any) -> str:
    import mpisplit as ms
    from mpisplit.models import hf
    from mpisplit.models.lora import apply_lora, load_adapter, merge_lora
    from mpisplit.models.peft_adapter import read_adapter
    from mpisplit.runtime.errors import agree

    with agree(world):
        cfg = hf.read_config(hf_folder)
        tp = choose_tp(tp, world.Get_size(), cfg.n_head)
        cfg.validate(tp)
        dtype = dtype or hf.weights_dtype(hf_folder).name
        lora, arrays = read_adapter(adapter)
    grid = ms.ProcessGrid(tp=tp, comm=world)
    model = ms.GPT.from_pretrained(hf_folder, grid, dtype=dtype)
    with agree(world):
        apply_lora(model, lora, seed=0)
        load_adapter(model, arrays, adapter)
    merge_lora(model)
    model.save_pretrained(out)
    grid.free()
    return f"wrote {out} from {hf_folder} with the LoRA adapter {adapter} merged (rank {lora.rank}), {dtype}, tp={tp}"


def from_hf(hf_folder: str, out_root: str, step: int, tp: int | None, dtype: str | None, world: Any) -> str:
    import mpisplit as ms
    from mpisplit.models import hf
    from mpisplit.models.hf_eos import eos_token_ids
    from mpisplit.runtime.errors import agree
    from mpisplit.training.state import save_training_state

    with agree(world):
        if step < 0:
            raise ValueError(f"--step must be >= 0, got {step}")
        cfg = hf.read_config(hf_folder)
        tp = choose_tp(tp, world.Get_size(), cfg.n_head)
        cfg.validate(tp)
        dtype = dtype or hf.weights_dtype(hf_folder).name
        eos = list(eos_token_ids(hf_folder))
    grid = ms.ProcessGrid(tp=tp, comm=world)
    model = ms.GPT.from_pretrained(hf_folder, grid, dtype=dtype)
    source = {f"huggingface_{cfg.family}": str(hf_folder)}
    meta = {"config": model.config.to_dict(), "step": step, "dtype": dtype, "source": source, "eos_token_ids": eos}
    # keep_last=sys.maxsize: a conversion never deletes other checkpoints under OUT_ROOT.
    path = save_training_state(out_root, step, model, None, grid, meta=meta, keep_last=sys.maxsize)
    grid.free()
    return f"wrote {path} from {hf_folder}: {model.num_parameters():,} parameters, {dtype}, tp={tp}"


def from_gguf(path: str, out: str, world: Any) -> str:
    from mpisplit.models.gguf import convert_to_hf
    from mpisplit.runtime.errors import agree

    with agree(world):
        if world.Get_rank() == 0:
            convert_to_hf(path, out)
    return f"wrote {out} (config.json, generation_config.json, model.safetensors, tokenizer.json, " \
        f"tokenizer_config.json) from {path}"


def _checkpoint_tokenizer(meta: dict, path: Any) -> str:
    """The first folder with a tokenizer.json that a checkpoint's meta names: the Hugging Face
    folder it was converted from (--from-hf), then train's --init-from and --tokenizer."""
    from pathlib import Path

    args, source = meta.get("args"), meta.get("source")
    named = [*(source.values() if isinstance(source, dict) else [])]
    named += [args.get("init_from"), args.get("tokenizer")] if isinstance(args, dict) else []
    for folder in named:
        if isinstance(folder, str) and (Path(folder) / "tokenizer.json").is_file():
            return folder
    raise ValueError(f"{path} names no folder with a tokenizer.json (the folder it was converted or fine-tuned "
                     "from); a GGUF file needs the model's tokenizer: pass --tokenizer FOLDER")


def to_gguf(src: str, out: str, out_type: str, tokenizer: str | None, tp: int | None, world: Any) -> str:
    from pathlib import Path

    from mpisplit.models.gguf.writer import check_type, write_gguf
    from mpisplit.runtime.errors import agree

    with agree(world):
        check_type(out_type)
        if not Path(src).exists():
            raise FileNotFoundError(f"{src!r} does not exist (expected a Hugging Face folder or an mpisplit checkpoint)")
        if Path(out).exists():
            raise ValueError(f"output file {out!r} already exists; choose a new name")
        if tokenizer is not None and not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"--tokenizer folder {tokenizer!r} does not exist")
        hf_folder = (Path(src) / "config.json").is_file()
    if not hf_folder:
        return checkpoint_to_gguf(src, out, out_type, tokenizer, tp, world)
    with agree(world):
        export = write_gguf(src, out, out_type, tokenizer) if world.Get_rank() == 0 else None
    return export.summary() if export is not None else ""


def checkpoint_to_gguf(src: str, out: str, out_type: str, tokenizer: str | None, tp: int | None, world: Any) -> str:
    """--to-gguf of a checkpoint: --to-hf into a temporary folder beside `out` (all ranks), then
    rank 0 writes the GGUF file from it and removes it."""
    import shutil
    import tempfile
    from pathlib import Path

    from mpisplit.models.gguf.writer import write_gguf
    from mpisplit.runtime.errors import agree
    from mpisplit.training.checkpoint import CheckpointReader
    from mpisplit.training.state import resolve_checkpoint

    rank0 = world.Get_rank() == 0
    with agree(world):
        try:
            path = resolve_checkpoint(src)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{src!r} is neither a Hugging Face folder (no config.json) nor an mpisplit "
                                    f"checkpoint: {exc}") from None
    reader = CheckpointReader(path, world, verify=False)
    with agree(world):
        tokenizer = tokenizer or _checkpoint_tokenizer(reader.meta, path)
        tmp = None
        if rank0:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".to-gguf-", dir=Path(out).parent)
    reader.close()
    tmp = world.bcast(tmp, root=0)  # only rank 0 writes into it
    try:
        to_hf(str(path), str(Path(tmp) / "hf"), tp, None, world)
        with agree(world):
            name = Path(src).resolve().name
            export = write_gguf(Path(tmp) / "hf", out, out_type, tokenizer, name) if rank0 else None
    finally:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
    if export is None:
        return ""
    export.source = path
    return export.summary()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from mpi4py import MPI

    from mpisplit.runtime.errors import install_abort_on_exception

    world = MPI.COMM_WORLD
    install_abort_on_exception(world)
    # Each option takes two values (nargs=2; --merge-lora three).
    if args.to_hf:
        ckpt, out = args.to_hf
        summary = to_hf(ckpt, out, args.tp, args.dtype, world)
    elif args.merge_lora:
        hf_folder, adapter, out = args.merge_lora
        summary = merge_adapter(hf_folder, adapter, out, args.tp, args.dtype, world)
    elif args.to_gguf:
        src, out = args.to_gguf
        summary = to_gguf(src, out, args.type or "f16", args.tokenizer, args.tp, world)
    elif args.from_gguf:
        gguf_file, out = args.from_gguf
        summary = from_gguf(gguf_file, out, world)
    else:
        hf_folder, out_root = args.from_hf
        summary = from_hf(hf_folder, out_root, args.step, args.tp, args.dtype, world)
    if world.Get_rank() == 0:
        print(summary, flush=True)
    return 0

