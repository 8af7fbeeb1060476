"""Module and Parameter: named, sharded weights and their initialisation.

A `Parameter` knows where its local slab sits in the global (unsplit) weight:
`split_axis` (None: replicated on every TP rank), `start` (the slab's offset
along that axis) and `global_shape`, the logical (unpadded) shape. Weights whose
slab is not one contiguous block of the stored matrix (a fused QKV weight split
by heads) describe the global tensor in a "shard view" (`view_shape`) in which it
is: the local data reshaped to `view_shape` is the block [start, start + n) of
`global_shape` along `split_axis`.

Initialisation draws every full weight from a seed derived from (seed,
parameter name) and keeps the slab, so a seed gives the same global model at
every TP degree.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from mpisplit.autograd.tensor import Tensor
from mpisplit.runtime.backend import get_array_module


class Parameter(Tensor):
    """A trainable slab of a (possibly split) weight."""

    def __init__(
        self,
        data: Any,
        *,
        split_axis: int | None = None,
        global_shape: tuple[int, ...] | None = None,
        start: int = 0,
        view_shape: tuple[int, ...] | None = None,
        init: tuple[Any, ...] = ("zeros",),
    ) -> None:
        super().__init__(data, requires_grad=True)
        self.view_shape = tuple(view_shape) if view_shape is not None else self.shape
        self.global_shape = tuple(global_shape) if global_shape is not None else self.view_shape
        self.split_axis = split_axis
        self.start = int(start)
        self.init = init  # ("normal", std) | ("uniform", bound) | ("zeros",) | ("ones",)
        # A second copy of a weight that another pipeline stage owns (the last stage's tied
        # head): its gradient is summed with the owner's, it is saved and counted there.
        self.pipeline_copy = False
        # A slab that `replicas` TP ranks hold alike (a key/value head replicated because tp >
        # kv heads): its gradient is summed over them, it is saved and counted by replica 0.
        self.replicas, self.replica_rank = 1, 0
        # The slab as a GGUF file's quantized blocks (nn/quantized.py; serving), or None.
        self.quantized: Any = None
        if int(np.prod(self.view_shape)) != self.size:
            raise ValueError(f"view_shape {self.view_shape} does not hold a slab of shape {self.shape}")

    @property
    def is_replicated(self) -> bool:
        return self.split_axis is None

    def slab_bounds(self) -> tuple[int, int]:
        """[start, stop) of this slab along split_axis in global (padded) coordinates."""
        if self.split_axis is None:
            return 0, self.global_shape[0] if self.global_shape else 1
        return self.start, self.start + self.view_shape[self.split_axis]

    def slab_of(self, full: np.ndarray) -> np.ndarray:
        """This rank's slab cut from the full logical array, zero-filled where the slab
        runs past the logical length (padding), in the shape of `data`."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"expected a global array of shape {self.global_shape}, got {tuple(full.shape)}")
        if self.split_axis is None:
            return full.reshape(self.shape)
        ax = self.split_axis
        lo, hi = self.slab_bounds()
        out = np.zeros(self.view_shape, dtype=full.dtype)
        real = max(0, min(hi, full.shape[ax]) - lo)
        if real:
            src = [slice(None)] * full.ndim
            src[ax] = slice(lo, lo + real)
            dst = [slice(None)] * full.ndim
            dst[ax] = slice(0, real)
            out[tuple(dst)] = full[tuple(src)]
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        where = "replicated" if self.split_axis is None else f"split axis {self.split_axis} at {self.start}"
        return f"Parameter(local {self.shape}, global {self.global_shape}, {where}, dtype={self.dtype})"


def seed_for(seed: int, name: str) -> np.random.SeedSequence:
    """The seed of one named parameter: independent of TP degree and construction order."""
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])


def global_init(param: Parameter, name: str, seed: int) -> np.ndarray:
    """The full logical weight of `param` in float64, as its init rule and seed make it."""
    kind = param.init[0]
    if kind == "zeros":
        return np.zeros(param.global_shape)
    if kind == "ones":
        return np.ones(param.global_shape)
    if kind == "normal":
        rng = np.random.default_rng(seed_for(seed, name))
        return rng.standard_normal(param.global_shape) * float(param.init[1])
    if kind == "uniform":
        bound = float(param.init[1])
        return np.random.default_rng(seed_for(seed, name)).uniform(-bound, bound, param.global_shape)
    raise ValueError(f"unknown init rule {param.init!r} for parameter {name}")


class Module:
    """Base class: parameters and submodules found by attribute, in definition order."""

    training: bool = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def _children(self) -> Iterator[tuple[str, Any]]:
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, v in enumerate(value):
                    yield f"{name}.{i}", v

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for name, value in self._children():
            full = f"{prefix}{name}"
            if isinstance(value, Parameter):
                if id(value) not in seen:  # a tied weight is listed once
                    seen.add(id(value))
                    yield full, value
            else:
                for sub_name, p in value.named_parameters(prefix=f"{full}."):
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield sub_name, p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator[Module]:
        yield self
        for _, value in self._children():
            if isinstance(value, Module):
                yield from value.modules()

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def reset_parameters(self, seed: int) -> None:
        """Draw every parameter from its init rule, the same global weights at any TP degree."""
        for name, p in self.named_parameters():
            full = global_init(p, name, seed)
            xp = get_array_module(p.data)
            p.data[...] = xp.asarray(p.slab_of(full), dtype=p.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Local slabs by name (the arrays themselves, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy local slabs in; every parameter must be present with its local shape."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"{name}: expected local shape {p.shape}, got {tuple(value.shape)}")
            xp = get_array_module(p.data)
            p.data[...] = xp.asarray(value, dtype=p.dtype)
