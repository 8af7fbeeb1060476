"""The 1F1B pipeline schedule (PipeDream-Flush, as in Megatron-LM) for one stage.

With p stages and m micro-batches, stage s runs

    warm-up    w = min(p - s - 1, m) forwards
    steady     m - w times: one forward, then one backward (of the oldest micro-batch in flight)
    cool-down  w backwards

so at most p - s micro-batches hold activations on stage s at any time, and every stage idles
for (p - 1) forward-backward slots per step: a bubble of (p - 1) / (m + p - 1) of the step.

`step(i, x)` runs the forward of micro-batch i on this stage: on the first stage x is None (the
stage reads its own tokens); elsewhere x is the received activation (a Tensor that requires a
gradient). It returns the stage's output: the activation for the next stage, or on the last stage
the micro-batch's loss, already divided by m. Backward of the last stage seeds with 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from mpisplit.autograd.tensor import Tensor, no_grad
from mpisplit.parallel.pipeline.p2p import StageLink


def warmup_count(stages: int, stage: int, micro_batches: int) -> int:
    """Forwards stage `stage` runs before its first backward."""
    return min(stages - stage - 1, micro_batches)


def _as_input(buf: Any) -> Tensor | None:
    return None if buf is None else Tensor(buf, requires_grad=True)


def _backward(x: Tensor | None, y: Tensor, grad: Any) -> Any:
    """Backward through one micro-batch of this stage; the gradient of its input (or None)."""
    if isinstance(grad, float):  # the last stage's loss seed, in the loss's own dtype
        grad = y.xp.asarray(grad, dtype=y.dtype)
    y.backward(grad)  # grad None: the last stage's loss, seeded with 1
    if x is None:
        return None
    return x.xp.ascontiguousarray(x.grad)


def one_forward_one_backward(
    step: Callable[[int, Tensor | None], Tensor], micro_batches: int, link: StageLink,
    shape: tuple[int, ...], dtype: Any, like: Any = None, loss_seed: float | None = None,
) -> list[Tensor]:
    """Forward and backward of `micro_batches` micro-batches on this stage, in 1F1B order.

    `shape`/`dtype`: the activation every stage boundary carries (the same both ways); `like`:
    an array on the device the received buffers belong on; `loss_seed`: the gradient the last
    stage's backward starts from (None: 1; a loss scale under mixed precision). Returns the
    outputs of `step` (on the last stage: the losses divided by m)."""
    m = micro_batches
    warmup = warmup_count(link.stages, link.stage, m)
    in_flight: deque[tuple[Tensor | None, Tensor]] = deque()
    outputs: list[Tensor] = []

    def forward(i: int, x: Tensor | None) -> Tensor:
        y = step(i, x)
        in_flight.append((x, y))
        outputs.append(y)
        return y

    for i in range(warmup):
        y = forward(i, _as_input(link.recv_forward(shape, dtype, like)))
        link.send_forward(y.data)
    steady = m - warmup
    x = _as_input(link.recv_forward(shape, dtype, like)) if steady else None
    for j in range(steady):
        y = forward(warmup + j, x)
        grad = link.send_forward_recv_backward(y.data, shape, dtype)
        dx = _backward(*in_flight.popleft(), loss_seed if link.next is None else grad)
        if j == steady - 1:
            link.send_backward(dx)
        else:
            x = _as_input(link.send_backward_recv_forward(dx, shape, dtype, like))
    for _ in range(warmup):
        grad = link.recv_backward(shape, dtype, like)
        link.send_backward(_backward(*in_flight.popleft(), loss_seed if link.next is None else grad))
    assert not in_flight
    return outputs


def forward_only(
    step: Callable[[int, Tensor | None], Tensor], micro_batches: int, link: StageLink,
    shape: tuple[int, ...], dtype: Any, like: Any = None,
) -> list[Tensor]:
    """The forwards alone (evaluation), without a graph: each micro-batch flows down the chain."""
    outputs = []
    with no_grad():
        for i in range(micro_batches):
            buf = link.recv_forward(shape, dtype, like)
            y = step(i, None if buf is None else Tensor(buf))
            link.send_forward(y.data)
            outputs.append(y)
    return outputs
