"""Tensor and a small explicit reverse-mode autograd.

A `Tensor` wraps one array of the active backend (NumPy or CuPy). Every
differentiable operation is a `Function` subclass with a `forward` on raw arrays
and a `backward` that maps the output gradient to one gradient per input.
`Tensor.backward()` sorts the graph topologically and walks it in reverse,
accumulating gradients; the graph and the intermediates saved by each
`Function` are released as the walk passes them.

Arithmetic operators and methods (`a + b`, `a @ b`, `t.sum()`) are attached by
`mpisplit.autograd.operators`, which sits above the primitives: this file imports none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from mpisplit.runtime.backend import get_array_module

_grad_mode = threading.local()


def is_grad_enabled() -> bool:
    """Whether operations record the graph (False inside `no_grad`)."""
    return getattr(_grad_mode, "enabled", True)


@contextmanager
def no_grad() -> Iterator[None]:
    """Run the body without recording the graph (evaluation, decoding, updates)."""
    previous = is_grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def _as_array(data: Any) -> Any:
    """NumPy and CuPy arrays pass through; anything else becomes a NumPy array."""
    if isinstance(data, np.ndarray) or type(data).__module__.split(".")[0] == "cupy":
        return data
    return np.asarray(data)


class Tensor:
    """An array with an optional gradient and the `Function` that produced it."""

    # Let `np.float64(2) * tensor` reach Tensor.__rmul__ instead of NumPy.
    __array_priority__ = 1000

    def __init__(self, data: Any, requires_grad: bool = False, _ctx: Function | None = None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        self.data: Any = _as_array(data)
        self.grad: Any = None
        self.requires_grad = bool(requires_grad)
        self._ctx = _ctx
        self._freed = False  # set once backward() has walked (and dropped) this node's graph
        # Where backward() puts this leaf's gradient when set (see mpisplit.training.grad_buffer).
        self.grad_store: Any = None
        # Called with this leaf after each backward walk has added its gradient (the walk has
        # passed every use of the leaf by then): mpisplit.training.overlap starts sending a
        # gradient bucket as soon as its last gradient is in.
        self.grad_hook: Callable[[Tensor], None] | None = None

    # ----------------------------------------------------------------- views
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def xp(self) -> Any:
        return get_array_module(self.data)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def numpy(self) -> np.ndarray:
        """A host NumPy copy (or view, on the CPU) of the data."""
        from mpisplit.runtime.backend import to_numpy

        return to_numpy(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a single-element tensor, got shape {self.shape}")
        return float(self.numpy().reshape(-1)[0])

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data)

    if TYPE_CHECKING:
        # Attached at import by mpisplit.autograd.operators.install(), each one primitive of
        # `ops`; declared here for the type checker only (this file imports no primitive).
        def __add__(self, other: Any) -> Tensor: ...
        def __radd__(self, other: Any) -> Tensor: ...
        def __sub__(self, other: Any) -> Tensor: ...
        def __rsub__(self, other: Any) -> Tensor: ...
        def __mul__(self, other: Any) -> Tensor: ...
        def __rmul__(self, other: Any) -> Tensor: ...
        def __truediv__(self, other: Any) -> Tensor: ...
        def __rtruediv__(self, other: Any) -> Tensor: ...
        def __neg__(self) -> Tensor: ...
        def __matmul__(self, other: Any) -> Tensor: ...
        def __getitem__(self, index: Any) -> Tensor: ...
        def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor: ...
        def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor: ...
        def reshape(self, *shape: Any) -> Tensor: ...
        def transpose(self, *axes: Any) -> Tensor: ...
        def exp(self) -> Tensor: ...
        def log(self) -> Tensor: ...

    # --------------------------------------------------------------- autograd
    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf that requires it.

        With no argument the tensor must hold one element (a loss) and the seed
        gradient is 1. The graph is freed as it is walked, so a second call on the
        same graph raises.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if self._freed:
            raise RuntimeError("backward() through a graph that was already freed by an earlier backward()")
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a gradient needs a single-element tensor, got shape {self.shape}")
            grad = self.xp.ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} does not match tensor shape {self.shape}")

        claims = _claims()
        outermost = not claims
        try:
            self._walk(grad, claims)
        finally:
            if outermost:
                claims.clear()

    def _walk(self, grad: Any, claims: set[int]) -> None:
        order = _topological_order(self)
        grads: dict[int, Any] = {id(self): grad}
        owned: set[int] = set()  # ids of tensors whose pending gradient this pass may modify in place
        assigned: set[int] = set()  # array ids already stored in some leaf's .grad during this pass
        fresh: dict[int, Any] = {}  # arrays grad_target() made in this pass, not yet returned
        _walks().append((grads, owned, fresh))
        try:
            self._walk_nodes(order, grads, owned, fresh, assigned, claims)
        finally:
            _walks().pop()

    @staticmethod
    def _walk_nodes(order: list[Tensor], grads: dict[int, Any], owned: set[int], fresh: dict[int, Any],
                    assigned: set[int], claims: set[int]) -> None:
        while order:
            # Popped, not iterated: a node's forward output is then released as soon as the walk
            # has passed it (unless something else holds it), not kept until the walk ends.
            node = order.pop()
            g = grads.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is None:  # a leaf
                store = node.grad_store
                mine = g is store or id(node) not in claims  # else an outer pass holds the store
                if store is not None and mine and _fits(store, g) and (node.grad is None or node.grad is store):
                    # A preassigned gradient buffer (a view of a flat one): written or added in place.
                    claims.discard(id(node))
                    if node.grad is None:
                        if g is not store:
                            store[...] = g
                        node.grad = store
                    else:
                        store += g
                elif node.grad is None:
                    # Own the array: a view (broadcast, slice) or one shared with another leaf is copied.
                    if id(g) in assigned or getattr(g, "base", None) is not None:
                        g = g.copy()
                    node.grad = g
                    assigned.add(id(node.grad))
                else:
                    node.grad = node.grad + g
                if node.grad_hook is not None:
                    node.grad_hook(node)
                continue
            in_grads = ctx.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for parent, pg in zip(ctx.inputs, in_grads):
                if pg is None or not parent.requires_grad:
                    continue
                assert tuple(pg.shape) == parent.shape, (type(ctx).__name__, pg.shape, parent.shape)
                key = id(parent)
                pending = grads.get(key)
                made_here = fresh.pop(id(pg), None) is pg
                if pending is None:
                    grads[key] = pg
                    if made_here or pg is parent.grad_store:  # from grad_target(): ours to add into
                        owned.add(key)
                elif key in owned:
                    pending += pg
                else:
                    grads[key] = pending + pg
                    owned.add(key)
            # Release the graph behind us: saved intermediates go with the Function.
            ctx.saved = ()
            ctx.inputs = ()
            node._ctx = None
            node._freed = True


_pass = threading.local()


def _claims() -> set[int]:
    if not hasattr(_pass, "claims"):
        _pass.claims = set()
    return _pass.claims


def _walks() -> list[tuple[dict[int, Any], set[int], dict[int, Any]]]:
    # (pending gradients, ids this pass owns, arrays grad_target made) of each backward walk
    # running in this thread
    if not hasattr(_pass, "walks"):
        _pass.walks = []
    return _pass.walks


def pending_grad(t: Tensor, dtype: Any, xp: Any) -> Any:
    """Inside backward(): the gradient of t that the running walk has gathered so far, when that
    walk owns it (an array it made or t's gradient buffer view) and it is a `dtype` array of
    `xp`, or None. A Function may add its contribution into it in place and return None for t:
    a sparse update (embedding rows) then costs only the rows it touches, not a dense zero
    array and its addition."""
    walks = _walks()
    if not walks:
        return None
    grads, owned, _ = walks[-1]
    acc = grads.get(id(t)) if id(t) in owned else None
    if acc is None or acc.dtype != dtype or get_array_module(acc) is not xp:
        return None
    return acc


def grad_target(t: Tensor, shape: tuple[int, ...], dtype: Any, xp: Any) -> Any:
    """Inside backward(): the array a Function writes leaf t's whole gradient into and returns.
    t's gradient buffer view when it may be (given at most once per leaf and pass, and only while
    t holds no gradient, so nothing pending is overwritten), else a new uninitialised array.
    Either way the walk owns what is returned, so later contributions are added into it in place
    (`pending_grad`), the same with a gradient buffer as without."""
    store = t.grad_store
    if (store is None or t._ctx is not None or t.grad is not None or id(t) in _claims()
            or tuple(store.shape) != tuple(shape) or store.dtype != dtype or get_array_module(store) is not xp):
        out = xp.empty(shape, dtype=dtype)
        walks = _walks()
        if walks:
            walks[-1][2][id(out)] = out
        return out
    _claims().add(id(t))
    return store


def _fits(store: Any, g: Any) -> bool:
    return tuple(store.shape) == tuple(g.shape) and store.dtype == g.dtype and type(store) is type(g)


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from `root` through requires-grad edges, parents first."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            # Leaves pushed first, so popped after the inputs computed from them: each leaf then
            # lands in `order` after its consumers' inputs, and backward reaches it (writes its
            # gradient) right after its last consumer, not at the end of the walk. The order
            # among the other tensors, and so every sum of gradients, is unchanged.
            inputs = [p for p in node._ctx.inputs if p.requires_grad and id(p) not in visited]
            stack.extend((p, False) for p in inputs if p._ctx is None)
            stack.extend((p, False) for p in inputs if p._ctx is not None)
    return order


class Function:
    """One differentiable operation.

    Subclasses implement `forward(*arrays, **options)` returning an array and
    `backward(grad)` returning one gradient (or None) per tensor input, in order.
    `self.needs_input_grad[i]` says whether input i wants a gradient, so backward
    can skip work; `self.save(...)` keeps what backward needs.
    """

    def __init__(self, *inputs: Tensor) -> None:
        self.inputs: tuple[Tensor, ...] = inputs
        self.needs_input_grad = tuple(t.requires_grad for t in inputs)
        self.requires_grad = is_grad_enabled() and any(self.needs_input_grad)
        self.saved: tuple[Any, ...] = ()

    def save(self, *values: Any) -> None:
        if self.requires_grad:
            self.saved = values

    def forward(self, *arrays: Any, **options: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def compute(cls, *arrays: Any, **options: Any) -> Any:
        """The forward on arrays, with no Tensors and no graph: the array `apply` would wrap
        (serving's lean forward, serving/lean.py, runs the same arithmetic this way)."""
        fn = cls.__new__(cls)
        fn.inputs, fn.needs_input_grad, fn.requires_grad, fn.saved = (), (), False, ()
        return fn.forward(*arrays, **options)

    @classmethod
    def apply(cls, *inputs: Tensor, **options: Any) -> Tensor:
        fn = cls(*inputs)
        out = fn.forward(*(t.data for t in inputs), **options)
        if fn.requires_grad:
            return Tensor(out, requires_grad=True, _ctx=fn)
        return Tensor(out)
