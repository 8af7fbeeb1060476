"""One flat gradient buffer for a list of parameters, each parameter's gradient a view of it.

`attach(params)` gives every parameter a `grad_store`: backward() then writes (or adds) the
parameter's gradient into that view instead of keeping a fresh array, so the gradients of a
step live in one preallocated block and the data-parallel average is one in-place all-reduce
of that block, with no concatenated copy beside the gradients. Parameters of different dtypes
or devices get one block each. Gradients keep PyTorch's semantics: `zero_grad()` sets them to
None and the next backward overwrites the view; a gradient kept from an earlier step must be
copied by whoever keeps it.

`multiple` pads the block with zeros to a multiple of that many elements: a block sharded over
dp ranks (training/sharded_optim.py) is padded to a multiple of dp, so every rank's contiguous
part has the same length. The padding is never a gradient's view and stays zero.
"""

from __future__ import annotations

from typing import Any

from mpisplit.runtime.backend import get_array_module


class GradBuffer:
    """A flat block and the parameters whose `grad_store` are views of it, in order."""

    def __init__(self, params: list[Any], multiple: int = 1) -> None:
        first = params[0].data
        xp = get_array_module(first)
        self.params = params
        self.size = sum(p.size for p in params)  # elements that are gradients
        self.multiple = multiple
        self.flat = xp.empty(-(-self.size // multiple) * multiple, dtype=first.dtype)
        self.flat[self.size:] = 0
        offset = 0
        for p in params:
            p.grad_store = self.flat[offset: offset + p.size].reshape(p.shape)
            p.grad_buffer = self
            offset += p.size

    def holds_all_gradients(self, params: list[Any]) -> bool:
        """True when `params` are exactly this buffer's (in any order) and every gradient is its view."""
        return _same_set(params, self.params) and all(p.grad is p.grad_store for p in params)


def _same_set(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and {id(x) for x in a} == {id(x) for x in b}


def _group_key(p: Any) -> tuple[str, str]:
    return (type(p.data).__module__.split(".")[0], str(p.dtype))


def attach(params: list[Any], multiple: int = 1) -> list[GradBuffer]:
    """Give `params` gradient views of one flat buffer per (array library, dtype), each padded
    to a multiple of `multiple` elements; idempotent (an existing buffer of the same parameters, in
    any order, whose padding is a multiple of `multiple` is kept)."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for p in params:
        groups.setdefault(_group_key(p), []).append(p)
    buffers = []
    for group in groups.values():
        existing = getattr(group[0], "grad_buffer", None)
        # the same parameters in another order (an optimizer's list, the model's): the same block
        if existing is not None and _same_set(existing.params, group) and existing.multiple % multiple == 0:
            buffers.append(existing)
        else:
            buffers.append(GradBuffer(group, multiple))
    return buffers


def buffer_of(params: list[Any]) -> GradBuffer | None:
    """The buffer that holds exactly these parameters' current gradients, if there is one."""
    buf = getattr(params[0], "grad_buffer", None) if params else None
    return buf if buf is not None and buf.holds_all_gradients(params) else None
