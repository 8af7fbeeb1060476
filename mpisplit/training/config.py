"""TrainConfig: everything one training run needs, one field per `mpisplit train` flag.

    from mpisplit.training import TrainConfig, train
    train(TrainConfig(steps=200, out="runs/a", tp=2))     # under mpiexec, on every rank

Field names are the flags without their dashes (`--seq-len` is `seq_len`); the command line
is built from this class, so the defaults below are the command's defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

_POSITIVE = ("pp", "micro_batches", "layers", "hidden", "heads", "seq_len", "steps", "batch_size", "eval_iters", "log_every", "keep_last")
_NON_NEGATIVE = ("eval_every", "save_every", "sample_len", "warmup", "save_every_minutes", "collective_timeout")


@dataclass
class TrainConfig:
    # ---- parallelism
    tp: int | None = None  # tensor-parallel degree (None: world size / pp)
    dp: int | None = None  # data-parallel degree (None: world size / (tp * pp))
    pp: int = 1  # pipeline stages (blocks spread over them; 1F1B schedule)
    micro_batches: int = 1  # micro-batches per step on each DP rank (pipelined, or accumulated at pp=1)
    sequence_parallel: bool = False  # split activations outside the TP regions along the sequence
    recompute: str = "none"  # activation recomputation: none, selective (attention core) or full (blocks)
    device: str = "cpu"  # where slabs live: cpu or gpu
    comm: str = "auto"  # GPU collectives: auto, mpi (CUDA-aware), staged (pinned host) or nccl
    # ---- model
    arch: str = "gpt"  # gpt (GPT-2 parts) or llama (RMSNorm, SwiGLU, rotary, grouped-query attention)
    layers: int = 4  # transformer blocks
    hidden: int = 128  # hidden size (a multiple of heads)
    heads: int = 4  # attention heads (tp must divide it)
    seq_len: int = 64  # context length in tokens
    dropout: float = 0.0  # dropout probability while training
    kv_heads: int | None = None  # --arch llama: key/value heads (None: --heads)
    intermediate: int | None = None  # MLP width (None: 4 * hidden)
    rope_theta: float = 10000.0  # --arch llama: rotary base
    dtype: str = "float32"  # float32 or float64
    amp: str | None = None  # mixed precision compute dtype: float16 or bfloat16 (float32 master weights)
    # ---- optimisation
    steps: int = 600  # optimizer steps
    batch_size: int = 16  # global batch: sequences per step over all DP ranks
    optimizer: str = "adamw"  # adamw or sgd
    shard_optimizer: bool = False  # AdamW state 1/dp per DP rank: reduce-scatter, update the part, all-gather
    overlap_grads: str = "auto"  # DP gradient reduction during backward: on, off, auto (on when DP spans nodes)
    lr: float = 3e-3  # peak learning rate
    min_lr: float | None = None  # final learning rate of the cosine schedule (None: lr / 10)
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.1
    momentum: float = 0.9  # SGD momentum
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    seed: int = 1337
    pack: bool = False  # chat corpus: several conversations per row, each attending to itself only
    # ---- LoRA (models/lora.py): adapters on the projections, the rest frozen
    lora_rank: int = 0  # adapter rank (0: full fine-tuning)
    lora_alpha: float | None = None  # adapter scale alpha / rank (None: alpha = rank, a scale of 1)
    lora_targets: str = "all-linear"  # Hugging Face projection names, comma-separated, or all-linear
    lora_dropout: float = 0.0  # dropout on the adapters' input while training (--lora-from: the adapter's unless given)
    lora_rslora: bool = False  # rank-stabilised scale alpha / sqrt(rank)
    lora_from: str | None = None  # start the adapters from a PEFT adapter folder (its settings apply)
    # ---- data and output
    data: str | None = None  # UTF-8 text file (None: CPython's documentation text), token ids, or a prepared corpus
    init_from: str | None = None  # fine-tune from a Hugging Face folder (GPT-2 or Llama family) or a GGUF file
    tokenizer: str | None = None  # a fresh model with this Hugging Face tokenizer folder's vocabulary
    out: str = "out"  # run folder: metrics, checkpoints, sample, loss curve
    eval_every: int = 100  # steps between validation evaluations
    eval_iters: int = 8  # validation batches per evaluation
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints to keep
    resume: bool = False  # continue from the latest checkpoint in out
    sample_len: int = 300  # tokens generated at the end (0: none)
    progress: bool = True  # a progress bar on rank 0
    plot: bool = True  # write out/loss.png at the end (when matplotlib is installed)
    # ---- failure handling
    save_every_minutes: float = 0.0  # also save when this many minutes passed since the last save (0: off)
    collective_timeout: float = 600.0  # seconds in MPI without progress before the job aborts (0: off)

    def validate(self, world_size: int) -> tuple[int, int]:
        """(tp, dp) for this world size, or ValueError naming the values; the same on every rank."""
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"--{_flag(name)} must be >= 0, got {value}")
        tp, dp = self._layout(world_size)
        if self.batch_size % dp:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by dp={dp}")
        self._check_pipeline(self.batch_size // dp, tp)
        if self.init_from is not None:  # the folder's shape counts, checked when the model is built
            self._check_choices()
            return tp, dp
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.heads % tp:
            works = [d for d in range(1, self.heads + 1) if self.heads % d == 0 and world_size % d == 0]
            raise ValueError(f"--heads {self.heads} cannot be split over tp={tp}; tp values that work: {works}")
        self._check_choices()
        return tp, dp

    def _layout(self, world_size: int) -> tuple[int, int]:
        pp = self.pp
        if world_size % pp:
            raise ValueError(f"--pp {pp} does not divide the world size {world_size}")
        stage_ranks = world_size // pp  # ranks per pipeline stage: dp x tp
        tp = stage_ranks if self.tp is None else self.tp
        if tp <= 0 or stage_ranks % tp:
            divisors = [d for d in range(1, stage_ranks + 1) if stage_ranks % d == 0]
            where = f"the world size {world_size}" if pp == 1 else f"world size {world_size} / --pp {pp} = {stage_ranks}"
            raise ValueError(f"--tp {tp} does not divide {where}; tp values that work: {divisors}")
        dp = stage_ranks // tp if self.dp is None else self.dp
        if dp * tp * pp != world_size:
            shown = f"--dp {dp} x --tp {tp}" + (f" x --pp {pp}" if pp > 1 else "")
            raise ValueError(f"{shown} = {dp * tp * pp} does not match the world size {world_size}")
        return tp, dp

    def _check_pipeline(self, rows: int, tp: int) -> None:
        if self.layers < self.pp:
            raise ValueError(f"--pp {self.pp} stages need at least {self.pp} blocks, got --layers {self.layers}")
        if rows % self.micro_batches:
            raise ValueError(
                f"--micro-batches {self.micro_batches} does not divide a DP rank's batch of {rows} sequences "
                f"(--batch-size {self.batch_size} / dp)"
            )
        if self.sequence_parallel and self.seq_len % tp:
            raise ValueError(
                f"--sequence-parallel splits the sequence over tp={tp} ranks: --seq-len {self.seq_len} "
                f"is not divisible by {tp}"
            )
        if self.pp > 1 and self.init_from is not None and not _llama_folder(self.init_from):
            raise ValueError(f"--init-from of a GPT-2 folder is not supported with --pp {self.pp}: fine-tune at --pp 1")

    def _check_choices(self) -> None:
        for name, allowed in (("arch", ("gpt", "llama")), ("device", ("cpu", "gpu")), ("comm", ("auto", "mpi", "staged", "nccl")),
                              ("dtype", ("float32", "float64")), ("amp", (None, "float16", "bfloat16")),
                              ("optimizer", ("adamw", "sgd")), ("recompute", ("none", "selective", "full")),
                              ("overlap_grads", ("auto", "on", "off"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {[a for a in allowed if a]}, got {getattr(self, name)!r}")
        if self.comm != "auto" and self.device != "gpu":
            raise ValueError(f"--comm {self.comm} applies to --device gpu (CPU arrays always go to MPI directly)")
        if self.amp is not None and self.dtype != "float32":
            raise ValueError(f"--amp keeps float32 master weights: use it with --dtype float32, not {self.dtype}")
        if self.amp == "bfloat16" and self.device != "gpu":
            raise ValueError("--amp bfloat16 needs --device gpu: NumPy has no bfloat16 arithmetic (use --amp float16)")
        if self.shard_optimizer and self.optimizer != "adamw":
            raise ValueError(f"--shard-optimizer shards AdamW's moments: use it with --optimizer adamw, "
                             f"not {self.optimizer}")
        if self.arch != "llama" and (self.kv_heads is not None or self.rope_theta != 10000.0):
            raise ValueError("--kv-heads and --rope-theta apply to --arch llama")
        if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
            raise ValueError(f"--kv-heads {self.kv_heads} must be positive and divide --heads {self.heads}")
        if self.intermediate is not None and self.intermediate <= 0:
            raise ValueError(f"--intermediate must be positive, got {self.intermediate}")
        self._check_lora()
        if self.lr < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"need --lr >= 0 and 0 <= --dropout < 1, got {self.lr} and {self.dropout}")

    def lora(self) -> Any:
        """The LoraConfig of --lora-rank and its companions (or of --lora-from's adapter), or None
        for full fine-tuning."""
        if self.lora_from is not None:
            return self._adapter_config()
        if not self.lora_rank:
            return None
        from mpisplit.nn.lora import LoraConfig, parse_targets

        alpha = float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
        return LoraConfig(rank=self.lora_rank, alpha=alpha, targets=parse_targets(self.lora_targets),
                          dropout=self.lora_dropout, rslora=self.lora_rslora)

    def _adapter_config(self) -> Any:
        from pathlib import Path

        from mpisplit.models.peft_adapter import read_adapter_config

        assert self.lora_from is not None
        found = read_adapter_config(Path(self.lora_from))
        if self.lora_rank and self.lora_rank != found.rank:
            raise ValueError(f"--lora-rank {self.lora_rank} differs from the rank {found.rank} of --lora-from "
                             f"{self.lora_from!r} (leave --lora-rank out to take the adapter's)")
        if self.lora_dropout:  # a training setting, not the adapter's: the flag wins
            found.dropout = self.lora_dropout
        return found

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if not self.lora_rank and self.lora_from is None:
            changed = [f"--{_flag(n)}" for n in ("lora_alpha", "lora_dropout", "lora_rslora")
                       if getattr(self, n) != getattr(TrainConfig, n)]
            if changed:
                raise ValueError(f"{', '.join(changed)} apply to LoRA: give --lora-rank R too")
            return
        if self.init_from is None:
            raise ValueError("LoRA adapts a pretrained model: give --init-from FOLDER")
        self.lora().validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flags(self) -> dict[str, Any]:
        """{"--flag": value}: what every rank compares before training."""
        return {f"--{_flag(k)}": v for k, v in sorted(asdict(self).items())}


def _llama_folder(source: str) -> bool:
    """A Llama-family folder or a GGUF file (their loader reads one pipeline stage's tensors)."""
    from mpisplit.models.hf import is_gguf
    from mpisplit.models.hf_llama import is_llama_folder

    return is_gguf(source) or is_llama_folder(source)


def _flag(name: str) -> str:
    return name.replace("_", "-")
