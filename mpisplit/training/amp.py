"""Mixed precision: 16-bit compute, float32 master weights, dynamic loss scaling.

Two models of the same configuration: the master (float32 parameters: the optimizer steps it
and checkpoints save it, so they are interchangeable with float32 runs) and its twin cast to
float16 or bfloat16, which runs forward and backward. Reductions that would lose precision in
16 bits run in float32 inside the ops (layer-norm statistics, softmax, cross-entropy, and the
gradient norm, which is taken on the float32 master gradients).

    master = ms.GPT(cfg, grid, seed=0)               # float32
    net = ms.GPT(cfg, grid, init=False)              # weights come from the master
    mp = ms.amp.MixedPrecision(net, master, "float16", grid.world)
    opt = ms.optim.AdamW(master.parameters(), lr=3e-4)
    loss = net.loss(x, y)                            # float32 loss of float16 logits
    mp.backward(loss)                                # d(scale * loss)
    if mp.unscale_():                                # master grads = float32(grads) / scale
        ms.optim.average_gradients(master.parameters(), grid.dp_comm)
        ms.optim.clip_grad_norm(master.parameters(), 1.0, grid.tp_comm)
        opt.step(); mp.update_model()                # master -> 16-bit copy
    mp.update_scale(); opt.zero_grad()

Loss scaling (Micikevicius et al. 2018): the loss is multiplied by S before backward so that
small gradients survive float16; the gradients are divided by S in float32. If any gradient on
any rank is inf or nan, every rank skips the step (one all-reduce over the world decides) and S
halves; after `growth_interval` good steps in a row S doubles. S stays a power of two, so the
unscaling is exact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpisplit.autograd.tensor import Tensor
from mpisplit.parallel.comm import Communicator
from mpisplit.runtime.backend import get_array_module
from mpisplit.training import grad_buffer

LOW_PRECISION = ("float16", "bfloat16")


def compute_dtype(name: Any, xp: Any = np) -> np.dtype:
    """The 16-bit dtype `name` on array module `xp`, or ValueError saying why not."""
    if isinstance(name, np.dtype):
        name = name.name
    if name == "float16":
        return np.dtype(np.float16)
    if name != "bfloat16":
        raise ValueError(f"unknown mixed-precision dtype {name!r}; expected one of {list(LOW_PRECISION)}")
    if xp is np:
        raise ValueError(
            "bfloat16 needs a GPU: NumPy has no bfloat16 arithmetic (use float16 on the CPU, "
            "or --device gpu with CuPy >= 14 and ml_dtypes)"
        )
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError("bfloat16 on CuPy needs the ml_dtypes package (CuPy >= 14 computes in it)") from None
    dtype = np.dtype(ml_dtypes.bfloat16)
    try:  # a matmul, a reduction and a cast: what the model needs
        probe = xp.ones((4, 4), dtype=dtype)
        ok = float((probe @ probe).astype(xp.float32).sum()) == 64.0
    except Exception as exc:  # any failure means: not supported here
        raise ValueError(f"this CuPy ({getattr(xp, '__version__', '?')}) cannot compute in bfloat16: {exc}") from exc
    if not ok:
        raise ValueError(f"this CuPy ({getattr(xp, '__version__', '?')}) computes bfloat16 matmuls wrongly")
    return dtype


def cast_module_(module: Any, dtype: Any) -> Any:
    """Cast every parameter of `module` to `dtype`, and every submodule's `.dtype`, in place."""
    dtype = np.dtype(dtype)
    for p in module.parameters():
        p.data = p.data.astype(dtype)
        p.grad = None
    for m in module.modules():
        if isinstance(getattr(m, "dtype", None), np.dtype):
            m.dtype = dtype
    return module


class LossScaler:
    """Dynamic loss scale: halve on overflow, double after `growth_interval` good steps."""

    def __init__(
        self, init_scale: float = 2.0**16, *, growth_interval: int = 2000, growth_factor: float = 2.0,
        backoff_factor: float = 0.5, min_scale: float = 1.0, max_scale: float = 2.0**24, dynamic: bool = True,
    ) -> None:
        for name, v in (("init_scale", init_scale), ("growth_factor", growth_factor), ("backoff_factor", backoff_factor)):
            m, _ = math.frexp(v) if v > 0 else (0.0, 0)
            if m != 0.5:
                raise ValueError(f"{name} must be a positive power of two (exact unscaling), got {v}")
        if not growth_factor > 1 or not backoff_factor < 1:
            raise ValueError(f"need growth_factor > 1 > backoff_factor, got {growth_factor} and {backoff_factor}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive integer, got {growth_interval!r}")
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= init_scale <= max_scale, got {min_scale}, {init_scale}, {max_scale}")
        self.scale = float(init_scale)
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor
        self.min_scale, self.max_scale, self.dynamic = float(min_scale), float(max_scale), dynamic
        self.good_steps = 0  # finite steps since the last change of scale
        self.skipped_steps = 0  # total steps skipped for overflow

    def update(self, overflow: bool) -> None:
        """After a step: `overflow` means the step was skipped (the same on every rank)."""
        if overflow:
            self.skipped_steps += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.growth_factor)
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps, self.skipped_steps = int(state["good_steps"]), int(state["skipped_steps"])


class MixedPrecision:
    """Pairs a 16-bit compute model with its float32 master and scales the loss.

    `model` is cast to `dtype` in place and loaded with the master's weights. `master` holds
    float32 parameters of the same names and shapes. `comm` (the world Communicator or an
    mpi4py communicator) agrees on overflow; None: this process alone.
    """

    def __init__(
        self, model: Any, master: Any, dtype: Any = "float16", comm: Any = None, *, scaler: LossScaler | None = None,
    ) -> None:
        mine, theirs = dict(model.named_parameters()), dict(master.named_parameters())
        if list(mine) != list(theirs):
            raise ValueError(
                f"model and master differ in parameters: {sorted(set(mine) ^ set(theirs)) or 'order'}"
            )
        for name, p in theirs.items():
            if p.dtype != np.float32:
                raise TypeError(f"master parameter {name} is {p.dtype}; master weights must be float32")
            if mine[name].shape != p.shape:
                raise ValueError(f"{name}: model shape {mine[name].shape} != master shape {p.shape}")
        xp = get_array_module(next(iter(theirs.values())).data)
        self.dtype = compute_dtype(dtype, xp)
        self.xp = xp
        self.model, self.master = model, master
        self.pairs = [(mine[name], theirs[name]) for name in theirs]
        # the pairs the optimizer steps (LoRA freezes the rest: no gradients, weights never change)
        self.trained = [(p, m) for p, m in self.pairs if m.requires_grad]
        self.comm = comm
        self.scaler = scaler if scaler is not None else LossScaler()
        # A ShardedAdamW holding the master weights of its part only writes the model itself
        # (sharded_optim.ShardedAdamW.shard_master_weights): update_model then has nothing to do.
        self.model_written_by_optimizer = False
        cast_module_(model, self.dtype)
        for p, m in self.pairs:  # every weight once; afterwards only the trained ones change
            p.data[...] = m.data.astype(p.dtype)

    @property
    def scale(self) -> float:
        return self.scaler.scale

    def backward(self, loss: Tensor) -> None:
        """Backward of scale * loss (the seed gradient is the scale)."""
        loss.backward(loss.xp.asarray(self.scaler.scale, dtype=loss.dtype))

    def unscale_(self) -> bool:
        """Master gradients = float32(model gradients) / scale; the model's are released.

        Returns True when every gradient on every rank is finite (collective over `comm`); on
        False the master gradients hold inf/nan and the step must be skipped.
        """
        xp = self.xp
        # the optimizer's flat gradient block when it was built on the same list, else our own
        buffers = grad_buffer.attach([m for _, m in self.trained])
        inv = 1.0 / self.scaler.scale
        for p, m in self.trained:
            view = m.grad_store
            if p.grad is None:
                view[...] = 0
                m.grad = None
                continue
            view[...] = p.grad  # widen to float32 first: unscaling in 16 bits would underflow
            view *= inv  # exact: the scale is a power of two
            m.grad = view
            p.grad = None
        finite = all(bool(xp.isfinite(b.flat).all()) for b in buffers)  # one host read per block
        return self._agree(finite)

    def _agree(self, finite: bool) -> bool:
        bad = np.array([0 if finite else 1], dtype=np.int32)
        if self.comm is None:
            return finite
        if isinstance(self.comm, Communicator):
            return int(self.comm.allreduce(bad, op="max")[0]) == 0
        from mpi4py import MPI

        out = np.empty_like(bad)
        self.comm.Allreduce(bad, out, op=MPI.MAX)
        return int(out[0]) == 0

    def update_model(self) -> None:
        """Copy the master weights into the 16-bit model (rounding to nearest); nothing when the
        optimizer writes the model (sharded master weights)."""
        if self.model_written_by_optimizer:
            return
        for p, m in self.trained:
            p.data[...] = m.data.astype(p.dtype)

    def update_scale(self, skipped: bool = False) -> None:
        """Advance the loss scale after a step; `skipped`: unscale_ returned False."""
        self.scaler.update(skipped)

    def zero_grad(self) -> None:
        for p, m in self.trained:
            p.grad = None
            m.grad = None

    def step(self, optimizer: Any, *, dp_comm: Any = None, tp_comm: Any = None, max_norm: float = 0.0) -> dict:
        """One whole update after `backward`: unscale, agree, DP average, clip, step, copy back,
        scale update, gradients cleared. Returns {"skipped", "grad_norm", "scale"} (scale
        before the update; grad_norm nan when skipped)."""
        from mpisplit.training import optim

        scale = self.scaler.scale
        finite = self.unscale_()
        norm = float("nan")
        if finite:
            params = [m for _, m in self.pairs]
            if dp_comm is not None:
                optim.average_gradients(params, dp_comm)
            if tp_comm is not None:
                norm = optim.clip_grad_norm(params, max_norm, tp_comm)
            optimizer.step()
            self.update_model()
        self.update_scale(not finite)
        self.zero_grad()
        return {"skipped": not finite, "grad_norm": norm, "scale": scale}
