"""Everything a run builds before its first step: the data, the model (fresh, fine-tuned from
GPT-2 weights or resumed), the optimizer, mixed precision. Collective over the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpisplit.models import GPT, GPTConfig
from mpisplit.models.hf import load_tokenizer
from mpisplit.models.hf import read_config as read_hf_config
from mpisplit.models.lora import apply_lora, load_adapter
from mpisplit.models.peft_adapter import read_adapter
from mpisplit.nn.lora import LoraConfig
from mpisplit.runtime.errors import agree
from mpisplit.training.amp import MixedPrecision
from mpisplit.training.checkpoint import CheckpointReader
from mpisplit.training.config import TrainConfig
from mpisplit.training.data import (
    TextDataset,
    TokenDataset,
    default_corpus,
    ids_digest,
    load_text,
    load_token_ids,
)
from mpisplit.training.optim import SGD, AdamW, Optimizer
from mpisplit.training.overlap import late_first, late_params
from mpisplit.training.prepared import load_tokens, uses_tokens
from mpisplit.training.sharded_optim import ShardedAdamW
from mpisplit.training.state import load_model, load_optimizer


@dataclass
class Data:
    dataset: TokenDataset
    text: str  # what the ranks compare (the text, a digest of token ids, a prepared corpus's manifest)
    hf_config: GPTConfig | None  # the config of init_from (GPT-2 or Llama family)


def load_data(config: TrainConfig, rank: int = 0, size: int = 1) -> Data:
    """The training text or token ids; raises ValueError naming the problem (call under agree on
    every rank: `rank` of `size` checks its share of a prepared corpus's sha256)."""
    if uses_tokens(config):  # a prepared corpus, or data encoded by --tokenizer
        data = Data(*load_tokens(config, rank, size))
    elif config.init_from is not None:
        if config.data is None:
            raise ValueError(
                "--init-from needs --data: token ids (.npy, or integers separated by spaces or commas), "
                "or text when the folder has a tokenizer (tokenizer.json, or vocab.json + merges.txt)"
            )
        hf_config = read_hf_config(config.init_from)
        ids = _fine_tuning_ids(config.data, config.init_from, hf_config.vocab_size)
        data = Data(TextDataset.from_ids(ids, hf_config.vocab_size), ids_digest(ids), hf_config)
    else:
        text = default_corpus() if config.data is None else load_text(config.data)
        data = Data(TextDataset(text), text, None)
    data.dataset.check_seq_len(config.seq_len)
    if config.pack:
        data.dataset.use_packing(config.seq_len)
    return data


def _fine_tuning_ids(path: str, folder: str, vocab_size: int) -> Any:
    """Token ids from `path`: read as ids (.npy, or a file of integers), else as text encoded
    by the folder's tokenizer."""
    tokenizer = load_tokenizer(folder, vocab_size)
    if tokenizer is None or Path(path).suffix == ".npy":
        return load_token_ids(path, vocab_size)
    text = load_text(path)
    words = text.replace(",", " ").split()
    if words and all(w.lstrip("-").isdigit() for w in words):
        return load_token_ids(path, vocab_size)
    ids = tokenizer.encode(text)
    if ids.size == 0:
        raise ValueError(f"{path!r} encodes to no tokens")
    return ids


@dataclass
class Model:
    config: GPTConfig
    model: GPT  # the weights the optimizer steps and checkpoints save
    net: GPT  # the one that runs forward and backward (a 16-bit copy with amp, else model)
    opt: Any
    mp: MixedPrecision | None
    start_step: int
    resume_meta: dict | None
    lora: LoraConfig | None  # the adapters' settings (None: full fine-tuning)


def open_checkpoint(path: Path | None, config: TrainConfig, data: TokenDataset, grid: Any) -> CheckpointReader | None:
    """The reader of the checkpoint to resume from, after checking it fits this run."""
    if path is None:
        return None
    reader = CheckpointReader(path, grid.world)
    meta = reader.meta
    with agree(grid.world):
        if meta.get("tokenizer") != (data.tokenizer.chars if data.tokenizer else None):
            raise ValueError(f"checkpoint {path} was trained on another alphabet (another --data?)")
        if config.steps < int(meta["step"]):
            raise ValueError(
                f"--steps {config.steps} is below the checkpoint's step {meta['step']} ({path}); "
                f"pass --steps > {meta['step']} to continue"
            )
    return reader


def model_config(config: TrainConfig, data: Data, reader: CheckpointReader | None, grid: Any) -> GPTConfig:
    if reader is not None:
        cfg = GPTConfig(**reader.meta["config"])
    elif data.hf_config is not None:
        cfg = data.hf_config
        cfg.dropout = config.dropout
    else:
        cfg = fresh_config(config, data.dataset.vocab_size)
    with agree(grid.world):
        cfg.validate(grid.tp)
        if config.seq_len > cfg.block_size:
            raise ValueError(f"--seq-len {config.seq_len} exceeds the checkpoint's block_size {cfg.block_size}")
    return cfg


def fresh_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    """The shape of a model trained from scratch: GPT-2 parts, or Llama's with --arch llama, with
    the data's vocabulary (its characters, a prepared corpus's tokenizer or --tokenizer's)."""
    shape: dict[str, Any] = {"vocab_size": vocab_size, "block_size": config.seq_len, "n_layer": config.layers,
                             "n_head": config.heads, "n_embd": config.hidden, "dropout": config.dropout}
    if config.arch == "llama":
        return GPTConfig.llama(**shape, n_kv_head=config.kv_heads, intermediate_size=config.intermediate,
                               rope_theta=config.rope_theta)
    return GPTConfig(**shape, intermediate_size=config.intermediate)


def build_model(config: TrainConfig, data: Data, reader: CheckpointReader | None, grid: Any) -> Model:
    cfg = model_config(config, data, reader, grid)
    if config.init_from is not None and reader is None:
        model = GPT.from_pretrained(config.init_from, grid, dtype=config.dtype).to(config.device)
        model.set_dropout(config.dropout)
        model.sequence_parallel = config.sequence_parallel and grid.tp > 1
        model.recompute = config.recompute
    else:
        model = GPT(cfg, grid, dtype=config.dtype, seed=config.seed, init=reader is None, device=config.device,
                    sequence_parallel=config.sequence_parallel, recompute=config.recompute)
    lora = config.lora()
    if lora is not None:
        with agree(grid.world):  # a GPT-2 model or a bad target: the same error on every rank
            apply_lora(model, lora, config.seed)
            if config.lora_from is not None and reader is None:
                load_adapter(model, read_adapter(config.lora_from)[1], config.lora_from)
    # LoRA: the adapters only; the gradients summed over TP or stages after backward first in
    # the gradient block (training/overlap.py), whether or not the DP reduction overlaps
    trained = late_first([p for p in model.parameters() if p.requires_grad], late_params(model, grid))
    opt: Optimizer
    if config.optimizer == "adamw" and config.shard_optimizer:
        opt = ShardedAdamW(trained, grid.dp_comm, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        opt = AdamW(trained, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    else:
        opt = SGD(trained, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    start_step, meta = 0, None
    if reader is not None:
        meta = reader.meta
        load_model(reader, model)
        with agree(grid.world):
            want = None if lora is None else lora.to_meta()
            if meta.get("lora") != want:
                raise ValueError(f"the checkpoint's LoRA settings {meta.get('lora')} differ from this run's "
                                 f"{want}: resume with the flags it was trained with")
            saved_opt = meta.get("optimizer", {}).get("type")
            if saved_opt != getattr(opt, "checkpoint_type", type(opt).__name__):
                raise ValueError(f"checkpoint optimizer {saved_opt} differs from --optimizer {config.optimizer}")
        load_optimizer(reader, model, opt)
        start_step = int(meta["step"])
        restore_rng(model, reader, grid)
        reader.close()
    net, mp = _mixed_precision(config, cfg, model, meta, grid, lora)
    if mp is not None and isinstance(opt, ShardedAdamW):
        opt.shard_master_weights(mp)  # float32 master weights of this rank's part only
    return Model(cfg, model, net, opt, mp, start_step, meta, lora)


def _mixed_precision(config: TrainConfig, cfg: GPTConfig, model: GPT, meta: dict | None, grid: Any,
                     lora: LoraConfig | None) -> tuple:
    """With amp, `net` (16-bit) runs forward and backward and `model` keeps the float32 master
    weights that the optimizer steps and checkpoints save; they share the dropout streams."""
    if config.amp is None:
        return model, None
    net = GPT(cfg, grid, dtype="float32", init=False, device=config.device, sequence_parallel=config.sequence_parallel,
              recompute=config.recompute)
    if lora is not None:  # the same adapters (and frozen weights) in the 16-bit twin
        apply_lora(net, lora, config.seed)
    net.rng_shared, net.rng_local = model.rng_shared, model.rng_local
    with agree(grid.world):
        mp = MixedPrecision(net, model, config.amp, grid.world)
        if meta is not None and meta.get("loss_scaler"):
            mp.scaler.load_state_dict(meta["loss_scaler"])  # continue with the saved scale
    return net, mp


def rng_state(model: GPT) -> dict:
    return {"shared": model.rng_shared.bit_generator.state, "local": model.rng_local.bit_generator.state}


def restore_rng(model: GPT, reader: CheckpointReader, grid: Any) -> None:
    """Dropout streams continue exactly when the layout is unchanged; otherwise they are reseeded."""
    if reader.tp == grid.tp and reader.dp == grid.dp and reader.pp == grid.pp:
        state = reader.rank_meta(grid.rank)
        if state:
            model.rng_shared.bit_generator.state = state["shared"]
            model.rng_local.bit_generator.state = state["local"]
