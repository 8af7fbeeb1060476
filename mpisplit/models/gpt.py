"""A decoder-only language model (GPT-2 or the Llama family), split over the TP ranks of a ProcessGrid.

    tokens (B, T) -> wte (vocab-parallel) [+ wpe] -> n_layer x [x + attn(ln_1(x)); x + mlp(ln_2(x))]
    -> ln_f -> logits = x @ wte^T (tied head) or x @ lm_head^T (vocab-parallel)

The parts come from the config (models/config.py): ln_* are LayerNorm or RMSNorm, attn is GPT-2's
fused attention with learned positions (wpe) or grouped-query attention with rotary positions
(nn/gqa.py), mlp is the GELU MLP or SwiGLU. Parameter names are the same for every family
(wte, h.{i}.ln_1, h.{i}.attn.c_attn | q_proj/k_proj/v_proj/o_proj, h.{i}.mlp.c_fc | gate_proj/
up_proj/down_proj, ln_f, lm_head); the Hugging Face names of each family are data in
models/hf_layout.py. `model(idx)` gathers the logits on every rank; `model.loss(idx, targets)`
keeps them split (vocab-parallel loss).

On a grid with pp > 1 stages the model is one stage: its share of the blocks (stage_blocks),
the embeddings on the first stage, ln_f and the head on the last (a tied head keeps a copy of
wte, marked `pipeline_copy`, whose gradient is summed with the first stage's). A stage runs
through `stage_forward` / `stage_loss`, driven by mpisplit.parallel.pipeline.

With `sequence_parallel` (training and loss evaluation; decoding never) the activations outside
the split layers are (B, T/t, h) blocks of the sequence on each TP rank: LayerNorm, dropout and
the residual adds run on the block. The gradients of the LayerNorms and of the row-split biases
are then partial on each TP rank: `sequence_parallel_params` lists them, to be summed over TP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mpisplit.autograd import Tensor, no_grad, ops
from mpisplit.models import hf_gpt2
from mpisplit.models.config import GPTConfig
from mpisplit.models.lora import lora_partial_params
from mpisplit.models.partition import BlockList, check_pipeline, stage_blocks
from mpisplit.models.recompute import check_recompute, recomputed
from mpisplit.nn.attention import KVCache, ParallelSelfAttention
from mpisplit.nn.cross_entropy import check_targets, vocab_parallel_cross_entropy
from mpisplit.nn.embedding import VocabParallelEmbedding
from mpisplit.nn.gqa import GroupedQueryAttention
from mpisplit.nn.layernorm import LayerNorm
from mpisplit.nn.mlp import ParallelMLP, SwiGLUMLP
from mpisplit.nn.module import Module, Parameter
from mpisplit.nn.packing import Packing, check_positions
from mpisplit.nn.rmsnorm import RMSNorm
from mpisplit.nn.rotary import RotaryTables
from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.mappings import gather_from_tp
from mpisplit.runtime.backend import get_array_module, resolve_dtype, to_numpy

if TYPE_CHECKING:
    from numpy.random import Generator

    from mpisplit.runtime.device import DeviceRandom

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS)


class PositionEmbedding(Module):
    """Learned absolute positions (block_size, h), replicated on every rank."""

    def __init__(self, block_size: int, hidden: int, dtype: np.dtype, std: float = 0.02) -> None:
        self.weight = Parameter(np.zeros((block_size, hidden), dtype=dtype), init=("normal", std))

    def forward(self, length: int, offset: int = 0, positions: Any = None) -> Tensor:
        """Rows offset..offset+length, or the rows of `positions` (B, n) (packed rows)."""
        if positions is not None:
            return ops.embedding(self.weight, get_array_module(self.weight.data).asarray(positions))
        return self.weight[offset: offset + length]


def _norm(cfg: GPTConfig, dtype: np.dtype) -> Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.layer_norm_eps, dtype=dtype)
    return LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, dtype=dtype)


class Block(Module):
    """Pre-norm transformer block: two all-reduces forward, two backward."""

    def __init__(self, cfg: GPTConfig, tp_comm: Any, dtype: np.dtype, rotary: RotaryTables | None = None) -> None:
        proj_std = 0.02 / np.sqrt(2 * cfg.n_layer)  # residual projections, GPT-2 scaling
        self.ln_1 = _norm(cfg, dtype)
        self.attn: ParallelSelfAttention | GroupedQueryAttention
        if cfg.positions == "learned":
            self.attn = ParallelSelfAttention(
                cfg.n_embd, cfg.n_head, tp_comm, dropout=cfg.dropout, dtype=dtype, proj_std=proj_std,
            )
        else:
            assert rotary is not None, "rotary positions need the model's RotaryTables"
            self.attn = GroupedQueryAttention(
                cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size, tp_comm, rotary, qkv_bias=cfg.qkv_bias,
                out_bias=cfg.out_bias, dropout=cfg.dropout, dtype=dtype, proj_std=proj_std,
            )
        self.ln_2 = _norm(cfg, dtype)
        self.mlp: SwiGLUMLP | ParallelMLP
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLUMLP(cfg.n_embd, cfg.ffn_size, tp_comm, bias=cfg.mlp_bias, dtype=dtype, proj_std=proj_std)
        else:
            self.mlp = ParallelMLP(cfg.n_embd, cfg.ffn_size, tp_comm, bias=cfg.mlp_bias, dtype=dtype, proj_std=proj_std)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, rngs: tuple[Any, Any], cache: KVCache | None = None, *, sequence_parallel: bool = False,
        recompute_core: bool = False, packing: Packing | None = None,
    ) -> Tensor:
        shared, local = rngs  # shared: the same stream on every TP rank (replicated activations)
        residual = local if sequence_parallel else shared  # sequence blocks differ: so do their masks
        p = self.dropout if self.training and cache is None else 0.0
        a = self.attn(self.ln_1(x), rng=local, cache=cache, sequence_parallel=sequence_parallel,
                      recompute_core=recompute_core, packing=packing, rngs=rngs)
        x = x + ops.dropout(a, p, residual)
        m = self.mlp(self.ln_2(x), sequence_parallel=sequence_parallel, rngs=rngs)
        return x + ops.dropout(m, p, residual)


class GPT(Module):
    """A decoder over `grid.tp_comm` (GPT-2 or Llama-family parts); see the module docstring."""

    def __init__(
        self, config: GPTConfig, grid: Any, *, dtype: Any = "float32", seed: int = 0, init: bool = True,
        device: str = "cpu", sequence_parallel: bool = False, recompute: str = "none",
    ) -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        config.validate(grid.tp)
        pp, stage = getattr(grid, "pp", 1), getattr(grid, "pp_rank", 0)
        check_pipeline(config.n_layer, pp)
        self.config, self.grid = config, grid
        self.dtype = resolve_dtype(dtype)
        self.is_first, self.is_last = stage == 0, stage == pp - 1
        comm = grid.tp_comm
        tied = config.tie_embeddings
        if self.is_first or (self.is_last and tied):
            self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd, comm, dtype=self.dtype)
            # The last stage's head is a copy of the first stage's table: saved once, by the first.
            self.wte.weight.pipeline_copy = not self.is_first
        self.lm_head = (VocabParallelEmbedding(config.vocab_size, config.n_embd, comm, dtype=self.dtype)
                        if self.is_last and not tied else None)
        learned = config.positions == "learned"
        self.wpe = PositionEmbedding(config.block_size, config.n_embd, self.dtype) if self.is_first and learned else None
        self.rotary = None if learned else RotaryTables(config.head_size, config.rope_theta, config.rope_scaling,
                                                          config.block_size)
        self.kv_replica_comm = _kv_replica_comm(config, comm)
        self.h = BlockList({i: Block(config, comm, self.dtype, self.rotary)
                            for i in stage_blocks(config.n_layer, pp, stage)})
        self.ln_f = _norm(config, self.dtype) if self.is_last else None
        self.sequence_parallel = bool(sequence_parallel) and grid.tp > 1
        self.recompute = check_recompute(recompute)  # none, selective (attention core) or full (blocks)
        # Dropout streams: replicated activations need the same mask on every TP rank;
        # attention weights belong to each rank's own heads. Stages draw their own streams.
        where = [grid.dp_rank] if pp == 1 else [grid.dp_rank, stage]
        self.rng_shared: Generator | DeviceRandom = np.random.default_rng([seed, 1, *where])
        self.rng_local: Generator | DeviceRandom = np.random.default_rng([seed, 2, *where, grid.tp_rank])
        self.device = "cpu"
        self.to(device)
        if init:
            self.reset_parameters(seed)

    def to(self, device: str) -> GPT:
        """Move the parameters to the current GPU ("gpu"; once bound by mpisplit.parallel.gpu.use_gpu)
        and draw dropout masks there, from the same host generators. In place."""
        if device == "gpu" and self.device != "gpu":
            from mpisplit.runtime.device import DeviceRandom, to_device

            to_device(self)
            # On the CPU the streams are host Generators; the device draws wrap them.
            host_shared, host_local = cast("Generator", self.rng_shared), cast("Generator", self.rng_local)
            self.rng_shared, self.rng_local = DeviceRandom(host_shared), DeviceRandom(host_local)
            self.device = "gpu"
        elif device != self.device:
            raise ValueError(f"cannot move a model from {self.device!r} to {device!r}")
        return self

    # ------------------------------------------------------------ forward
    def _check_idx(self, idx: Any, offset: int = 0) -> Any:
        idx = idx.data if isinstance(idx, Tensor) else idx
        if not hasattr(idx, "ndim") or idx.ndim != 2:
            raise ValueError(f"token ids must be a 2-d integer array (batch, time), got {getattr(idx, 'shape', idx)!r}")
        if offset + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence of {offset + idx.shape[1]} positions exceeds block_size={self.config.block_size}"
            )
        return idx  # the values are checked by the embedding lookup, before its all-reduce

    @property
    def sequence_parallel_params(self) -> list[Parameter]:
        """Parameters whose gradient is partial on each TP rank under sequence parallelism: every
        replicated one (LayerNorms, row-split biases, positions) sees only its rank's tokens."""
        if not self.sequence_parallel:
            return []
        return [p for p in self.parameters() if p.split_axis is None]

    @property
    def tp_partial_params(self) -> list[Parameter]:
        """Replicated parameters whose gradient is partial on each TP rank, summed over TP before
        the optimizer: under sequence parallelism every replicated one, else LoRA's replicated
        factors (models/lora.py), which see only this rank's share of the product."""
        if self.sequence_parallel:
            return self.sequence_parallel_params
        return lora_partial_params(self)

    def _check_sequence(self, idx: Any) -> None:
        T, tp = idx.shape[1], self.grid.tp
        if T % tp:
            raise ValueError(
                f"sequence parallelism splits the sequence over tp={tp} ranks: length {T} is not divisible by {tp}"
            )

    @property
    def kv_replica_params(self) -> list[Parameter]:
        """Key/value slabs replicated on several TP ranks (tp > kv heads): each holds a partial
        gradient, to be summed over `kv_replica_comm`."""
        return [p for p in self.parameters() if p.replicas > 1]

    @property
    def head(self) -> VocabParallelEmbedding:
        """The vocab-parallel output layer (last stage): the token table when tied, else lm_head."""
        return self.wte if self.lm_head is None else self.lm_head

    def embed(self, idx: Any, offset: int = 0, *, sequence_parallel: bool = False,
              packing: Packing | None = None) -> Tensor:
        """Token ids (B, T) -> token (+ position) embeddings (B, T, h), after dropout (first stage);
        with `sequence_parallel` this rank's (B, T/t, h) block of them; with `packing` the learned
        positions of each packed sequence restart at 0."""
        p = self.config.dropout if self.training and offset == 0 else 0.0
        if not sequence_parallel:
            x = self.wte(idx)  # (B, T, h)
            if self.wpe is not None:
                x = x + self.wpe(idx.shape[1], offset, None if packing is None else packing.on(x.data)[0])
            return ops.dropout(x, p, self.rng_shared)
        n = idx.shape[1] // self.grid.tp
        x = self.wte(idx, sequence_parallel=True)  # (B, T/t, h)
        if self.wpe is not None:
            block = None if packing is None else packing.block(self.grid.tp_rank, n)
            x = x + self.wpe(n, offset + self.grid.tp_rank * n, block)
        return ops.dropout(x, p, self.rng_local)

    def run_blocks(
        self, x: Tensor, caches: list[KVCache] | None = None, *, sequence_parallel: bool = False,
        packing: Packing | None = None,
    ) -> Tensor:
        """(B, T, h) through this stage's blocks; caches: one per block of this stage."""
        rngs = (self.rng_shared, self.rng_local)
        for i, block in enumerate(self.h):
            if caches is not None:
                x = block(x, rngs, caches[i])
            elif self.recompute == "full":
                def run(inp: Tensor, r: tuple, block: Block = block) -> Tensor:
                    return block(inp, r, sequence_parallel=sequence_parallel, packing=packing)
                x = recomputed(run, x, rngs)
            else:
                x = block(x, rngs, sequence_parallel=sequence_parallel,
                          recompute_core=self.recompute == "selective", packing=packing)
        return x

    def hidden_states(
        self, idx: Any, caches: list[KVCache] | None = None, *, sequence_parallel: bool = False,
        positions: Any = None,
    ) -> Tensor:
        """idx (B, T) -> final hidden states (B, T, h) after ln_f, the same on every TP rank (with
        `sequence_parallel`, and no caches: this rank's (B, T/t, h) block of them). `positions`
        (B, T): packed rows (nn/packing.py), each sequence computed as if alone."""
        self._check_whole("hidden_states")
        ln_f = self.ln_f
        assert ln_f is not None  # _check_whole: this is the last stage, which has ln_f
        offset = caches[0].length if caches else 0
        idx = self._check_idx(idx, offset)
        if caches is not None:
            if positions is not None:
                raise ValueError("packed rows are for training and scoring, not for decoding with a KV cache")
            return ln_f(self.run_blocks(self._embed_cached(idx, offset), caches))
        if sequence_parallel:
            self._check_sequence(idx)
        packing = self.packing(positions, idx.shape)
        x = self.embed(idx, sequence_parallel=sequence_parallel, packing=packing)
        return ln_f(self.run_blocks(x, sequence_parallel=sequence_parallel, packing=packing))

    def packing(self, positions: Any, shape: tuple[int, ...]) -> Packing | None:
        """The Packing of `positions` for token ids of `shape` (checked), or None for plain rows."""
        if positions is None or isinstance(positions, Packing):
            return positions
        return Packing(check_positions(positions, (shape[0], shape[1]), self.config.block_size))

    def _embed_cached(self, idx: Any, offset: int) -> Tensor:
        x = self.wte(idx)  # decoding: no dropout
        return x if self.wpe is None else x + self.wpe(idx.shape[1], offset)

    def stage_forward(self, inp: Any, packing: Packing | None = None) -> Tensor:
        """One pipeline stage's forward: token ids (first stage) or the previous stage's output
        (B, T, h) -> this stage's output (B, T, h); the last stage's output is after ln_f.
        `packing`: that of the micro-batch's rows (every stage needs it)."""
        sp = self.sequence_parallel
        if self.is_first:
            idx = self._check_idx(inp)
            if sp:
                self._check_sequence(idx)
            x = self.embed(idx, sequence_parallel=sp, packing=packing)
        else:
            x = inp
        x = self.run_blocks(x, sequence_parallel=sp, packing=packing)
        return x if self.ln_f is None else self.ln_f(x)  # the last stage's output is after ln_f

    def stage_loss(self, hidden: Tensor, targets: Any, ignore_index: int = -100,
                   normalizer: float | None = None) -> Tensor:
        """Last stage: mean cross-entropy of the hidden states after ln_f (vocab-parallel); with
        `normalizer`, the summed cross-entropy divided by it."""
        targets = targets.data if isinstance(targets, Tensor) else targets
        check_targets(targets, self.config.vocab_size, ignore_index)  # before any collective
        return vocab_parallel_cross_entropy(
            self.head.logits(hidden, sequence_parallel=self.sequence_parallel), targets, self.grid.tp_comm,
            vocab_start=self.head.vocab_start,
            vocab_size=self.config.vocab_size, ignore_index=ignore_index, overwrite_logits=True,
            normalizer=normalizer,
        )

    def _check_whole(self, what: str) -> None:
        if not (self.is_first and self.is_last):
            raise ValueError(
                f"GPT.{what} needs the whole model; this is stage {self.grid.pp_rank} of pp={self.grid.pp} "
                "(run stages with mpisplit.parallel.pipeline, or load the checkpoint at pp=1)"
            )

    def forward(self, idx: Any, positions: Any = None) -> Tensor:
        """idx (B, T) -> full logits (B, T, vocab_size) on every rank (all-gathered); `positions`:
        packed rows (see hidden_states)."""
        local = self.head.logits(self.hidden_states(idx, positions=positions))  # (B, T, Vp/t)
        full = gather_from_tp(local, self.grid.tp_comm)  # (B, T, Vp)
        V = self.config.vocab_size
        return full if full.shape[-1] == V else full[..., :V]

    def loss(self, idx: Any, targets: Any, ignore_index: int = -100, normalizer: float | None = None,
             positions: Any = None) -> Tensor:
        """Mean next-token cross-entropy (with `normalizer`: the sum divided by it); the logits
        stay split over the TP ranks. `positions`: packed rows (see hidden_states)."""
        targets = targets.data if isinstance(targets, Tensor) else targets
        idx = self._check_idx(idx)
        if tuple(targets.shape) != tuple(idx.shape):
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        check_targets(targets, self.config.vocab_size, ignore_index)  # before any collective
        hidden = self.hidden_states(idx, sequence_parallel=self.sequence_parallel, positions=positions)
        return self.stage_loss(hidden, targets, ignore_index, normalizer)

    # --------------------------------------------------------- generation
    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        n = self.config.block_size if max_len is None else max_len
        return [block.attn.new_cache(batch, n) for block in self.h]

    def generate(
        self, idx: Any, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
        seed: int = 0, use_cache: bool = True, callback: Any = None, eos_token_ids: tuple[int, ...] = (),
    ) -> np.ndarray:
        """Append up to `max_new_tokens` tokens to each row of idx (B, T0); returns (B, T0 + n) ids.

        A row that draws one of `eos_token_ids` ends there (the eos id is kept); later columns
        of that row repeat it, and generation stops once every row has ended, so n may be less
        than max_new_tokens. () never stops early (the loading code passes the model's ids).
        temperature below SAMPLING_EPS is greedy; otherwise sample from softmax(logits / temperature),
        restricted to the `top_k` most likely tokens when given, with a generator
        seeded by `seed` (the same on every rank, so every rank draws the same token).
        With `use_cache`, each rank keeps the keys and values of its own heads; when
        the context fills the position table, the cache is rebuilt from the newest
        block_size // 2 tokens. `callback(step, new_ids)` is called after each token.
        """
        idx = np.array(self._check_idx(idx), dtype=np.int64)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        eos = check_eos_ids(eos_token_ids, self.config.vocab_size)
        rng = np.random.default_rng(seed)
        ended = np.zeros(idx.shape[0], dtype=bool)
        S = self.config.block_size
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                caches = None
                for step in range(max_new_tokens):
                    if not use_cache:
                        logits = self(idx[:, -S:]).data[:, -1]
                    else:
                        if caches is None or caches[0].length >= S:
                            keep = idx.shape[1] if caches is None else max(1, S // 2)
                            caches = self.new_caches(idx.shape[0])
                            feed = idx[:, -keep:]
                        else:
                            feed = idx[:, -1:]
                        last = self.hidden_states(feed, caches)[:, -1:]  # the head on the newest row only
                        logits = gather_from_tp(self.head.logits(last), self.grid.tp_comm).data[:, 0, : self.config.vocab_size]
                    nxt = _choose(np.asarray(to_numpy(logits), dtype=np.float64), temperature, top_k, rng)
                    nxt = np.where(ended, idx[:, -1], nxt)  # an ended row repeats its eos
                    idx = np.concatenate([idx, nxt[:, None]], axis=1)
                    if callback is not None:
                        callback(step, nxt)
                    ended |= np.isin(nxt, eos)
                    if ended.all():
                        break
        finally:
            self.train(was_training)
        return idx

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability of every layer (e.g. after loading pretrained weights)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.config.dropout = p
        for block in self.h:
            block.dropout = p
            block.attn.dropout = p

    @classmethod
    def from_pretrained(cls, folder: Any, grid: Any, dtype: Any = "float32", **options: Any) -> GPT:
        """Load a Hugging Face folder (config.json + model.safetensors) of GPT-2 or the Llama family
        (model_type llama, qwen2, mistral), or a GGUF file; each rank reads only its slices. `options`
        (Llama family): max_model_len caps the context. See models/hf_gpt2.py, models/hf_llama.py."""
        from mpisplit.models import hf, hf_llama

        if hf.is_gguf(folder):
            return hf.from_gguf(cls, folder, grid, dtype, **options)
        if hf_llama.is_llama_folder(folder):
            return hf_llama.from_pretrained(cls, folder, grid, dtype, **options)
        if options:
            raise TypeError(f"options {sorted(options)} apply to Llama-family models, not to a GPT-2 folder")
        return hf_gpt2.from_pretrained(cls, folder, grid, dtype)

    def save_pretrained(self, folder: Any) -> None:
        """Write config.json + model.safetensors in the Hugging Face layout of the model's family
        (unpadded). Collective."""
        if self.config.family == "gpt2":
            hf_gpt2.save_pretrained(self, folder)
        else:
            from mpisplit.models import hf_llama

            hf_llama.save_pretrained(self, folder)

    def num_parameters(self) -> int:
        """Parameters of the global (unsplit, unpadded) model, of this stage's part at pp > 1;
        the tied head counted once (not at all on a last stage that is not also the first)."""
        return int(sum(np.prod(p.global_shape) for p in self.parameters() if not p.pipeline_copy))


def check_eos_ids(eos_token_ids: Any, vocab_size: int) -> np.ndarray:
    """The eos ids as an int64 array, or ValueError naming the bad one."""
    ids = tuple(eos_token_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < vocab_size:
            raise ValueError(f"eos token id {i!r} is not an integer in [0, {vocab_size})")
    return np.asarray(ids, dtype=np.int64)


def _kv_replica_comm(config: GPTConfig, tp_comm: Any) -> Communicator | None:
    """The TP ranks that hold the same key/value heads (tp > kv heads), or None. Collective over TP."""
    tp, kv = tp_comm.size, config.kv_heads
    if config.positions == "learned" or kv % tp == 0:
        return None
    rep = tp // kv
    return Communicator._adopt(tp_comm.mpi.Split(tp_comm.rank // rep, tp_comm.rank))


def _choose(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of logits (B, V): argmax, or a sample at `temperature` from the top k."""
    if temperature < SAMPLING_EPS:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)
