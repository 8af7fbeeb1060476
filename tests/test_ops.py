"""Every differentiable primitive against central finite differences (float64) and,
for the forward value, an independent NumPy formula."""

import math

import numpy as np
import pytest

from mpisplit.autograd import ops
from mpisplit.autograd.gradcheck import gradcheck
from mpisplit.autograd.tensor import Tensor, no_grad

TOL = 1e-6
rng = np.random.default_rng(1234)


def randn(*shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize(
    "fn, shapes",
    [
        (ops.add, [(3, 4), (4,)]),
        (ops.add, [(2, 1, 4), (3, 1)]),
        (ops.sub, [(3, 4), (3, 1)]),
        (ops.mul, [(2, 3, 4), (1, 3, 4)]),
        (lambda a, b: ops.div(a, b * b + 1.0), [(3, 4), (4,)]),
        (lambda a: -a, [(3, 2)]),
        (lambda a: a * 2.5 - 1.0 / (a * a + 2.0), [(5,)]),
        (ops.matmul, [(3, 4), (4, 5)]),
        (ops.matmul, [(2, 3, 4), (4, 5)]),
        (ops.matmul, [(2, 1, 3, 4), (3, 4, 2)]),
        (ops.linear, [(2, 3, 4), (4, 5), (5,)]),
        (ops.linear, [(3, 4), (4, 2)]),
        (ops.linear_t, [(2, 3, 4), (5, 4)]),
        (lambda a: ops.sum(a, axis=1), [(2, 3, 4)]),
        (lambda a: ops.sum(a, axis=(0, 2), keepdims=True), [(2, 3, 4)]),
        (lambda a: ops.mean(a, axis=-1), [(2, 3, 4)]),
        (lambda a: a.mean(), [(2, 3)]),
        (lambda a: a.reshape(4, 6), [(2, 3, 4)]),
        (lambda a: a.transpose(2, 0, 1), [(2, 3, 4)]),
        (lambda a: a[1:, ::2], [(3, 5)]),
        (lambda a: a[np.array([0, 2, 0, 1])], [(3, 2)]),
        (lambda a: ops.split(a, [1, 3], axis=1)[1] * 2.0 + ops.split(a, 2, axis=0)[0].sum(), [(4, 4)]),
        (lambda a, b: ops.concat([a, b, a], axis=1), [(2, 3), (2, 2)]),
        (lambda a: ops.exp(a), [(3, 4)]),
        (lambda a: ops.log(a * a + 0.5), [(3, 4)]),
        (ops.tanh, [(3, 4)]),
        (ops.gelu, [(4, 5)]),
        (lambda a: ops.relu(a + 0.05), [(4, 5)]),
        (lambda a: ops.softmax(a, axis=-1), [(3, 5)]),
        (lambda a: ops.softmax(a, axis=0), [(3, 5)]),
        (lambda a: ops.log_softmax(a, axis=-1), [(3, 5)]),
        (lambda x, w, b: ops.layer_norm(x, w, b), [(2, 3, 6), (6,), (6,)]),
        (lambda q, k, v: ops.attention(q, k, v), [(2, 2, 5, 3), (2, 2, 5, 3), (2, 2, 5, 3)]),
        (lambda q, k, v: ops.attention(q, k, v, causal=False), [(2, 3, 4), (2, 6, 4), (2, 6, 4)]),
        (lambda q, k, v: ops.attention(q, k, v, offset=3), [(1, 2, 3), (1, 5, 3), (1, 5, 3)]),
    ],
)
def test_gradients_match_finite_differences(fn, shapes):
    inputs = [randn(*s) for s in shapes]
    if fn is ops.relu:  # keep inputs away from the kink
        inputs = [np.where(np.abs(x) < 0.1, 0.5, x) for x in inputs]
    assert gradcheck(fn, inputs) < TOL


def test_relu_gradient_away_from_kink():
    x = randn(4, 5)
    x[np.abs(x) < 0.1] = 0.5
    assert gradcheck(ops.relu, [x]) < TOL


def test_embedding_gradient_with_repeated_ids():
    ids = np.array([[0, 3, 3], [1, 0, 3]])
    assert gradcheck(lambda w: ops.embedding(w, ids), [randn(5, 4)]) < TOL
    w = randn(5, 4)
    assert np.array_equal(ops.embedding(Tensor(w), ids).data, w[ids])


def test_cross_entropy_value_and_gradient_with_ignore_index():
    logits = randn(2, 4, 7)
    targets = np.array([[1, 6, -100, 0], [3, 3, 2, -100]])
    assert gradcheck(lambda z: ops.cross_entropy(z, targets), [logits]) < TOL
    # reference: explicit loop over the non-ignored rows
    losses = []
    for b in range(2):
        for t in range(4):
            if targets[b, t] == -100:
                continue
            z = logits[b, t]
            losses.append(math.log(np.exp(z).sum()) - z[targets[b, t]])
    got = ops.cross_entropy(Tensor(logits), targets).item()
    assert abs(got - np.mean(losses)) < 1e-12


def test_dropout_is_seeded_and_scaled():
    x = np.ones((200, 50))
    a = ops.dropout(Tensor(x), 0.25, np.random.default_rng(7)).data
    b = ops.dropout(Tensor(x), 0.25, np.random.default_rng(7)).data
    assert np.array_equal(a, b)
    assert set(np.unique(a)) == {0.0, 1.0 / 0.75}
    assert abs((a == 0).mean() - 0.25) < 0.02
    # gradient: the same mask applied to the upstream gradient (the rng is re-seeded per call)
    assert gradcheck(lambda t: ops.dropout(t, 0.3, np.random.default_rng(3)), [randn(6, 5)]) < TOL
    assert ops.dropout(Tensor(x), 0.5, None, training=False).data is x


def test_forward_values_against_formulas():
    x = randn(3, 6)
    gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert np.allclose(ops.gelu(Tensor(x)).data, gelu, rtol=1e-14, atol=1e-15)
    e = np.exp(x - x.max(-1, keepdims=True))
    assert np.allclose(ops.softmax(Tensor(x)).data, e / e.sum(-1, keepdims=True), rtol=1e-14)
    assert np.allclose(ops.log_softmax(Tensor(x)).data, np.log(e / e.sum(-1, keepdims=True)), rtol=1e-13)
    w, b = randn(6), randn(6)
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    assert np.allclose(ops.layer_norm(Tensor(x), Tensor(w), Tensor(b)).data, ln, rtol=1e-13, atol=1e-14)
    # softmax stays finite for huge logits
    big = np.array([[1000.0, 1000.0, -1000.0]])
    assert np.allclose(ops.softmax(Tensor(big)).data, [[0.5, 0.5, 0.0]])


def test_attention_matches_explicit_loop():
    q, k, v = randn(2, 4, 3), randn(2, 6, 3), randn(2, 6, 3)
    out = ops.attention(Tensor(q), Tensor(k), Tensor(v)).data  # offset = 6 - 4 = 2
    ref = np.zeros_like(out)
    for b in range(2):
        for i in range(4):
            visible = 2 + i + 1
            s = k[b, :visible] @ q[b, i] / math.sqrt(3)
            p = np.exp(s - s.max())
            ref[b, i] = (p / p.sum()) @ v[b, :visible]
    assert np.allclose(out, ref, rtol=1e-13, atol=1e-14)


def test_gradient_accumulates_over_uses_and_calls():
    w = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (w * w + w).sum().backward()  # d/dw = 2w + 1
    assert np.array_equal(w.grad, [3.0, 5.0])
    (w * 3.0).sum().backward()  # accumulates
    assert np.array_equal(w.grad, [6.0, 8.0])


def test_leaf_gradients_never_alias():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()
    a.grad *= 2.0
    assert np.array_equal(b.grad, np.ones(3))
    c = Tensor(np.ones((2, 3)), requires_grad=True)
    c.sum().backward()  # the sum's gradient is a broadcast view: must be copied
    c.grad[0, 0] = 5.0
    assert c.grad.sum() == 10.0


def test_graph_is_released_after_backward():
    x = Tensor(randn(3, 3), requires_grad=True)
    y = ops.gelu(x)
    loss = y.sum()
    loss.backward()
    assert y._ctx is None and loss._ctx is None
    with pytest.raises(RuntimeError):
        loss.backward()


def test_no_grad_records_nothing():
    x = Tensor(randn(2, 2), requires_grad=True)
    with no_grad():
        y = ops.matmul(x, x)
    assert not y.requires_grad and y._ctx is None


def test_bad_input_raises_clear_errors():
    a = Tensor(np.ones((2, 3)))
    with pytest.raises(TypeError, match="float64 and float32"):
        _ = a + Tensor(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(2, 3\)"):
        ops.matmul(a, a)
    with pytest.raises(ValueError, match="cannot be split into 2"):
        ops.split(a, 2, axis=1)
    with pytest.raises(TypeError, match="integers"):
        ops.embedding(Tensor(np.ones((4, 2))), np.array([0.5]))
    with pytest.raises(ValueError, match="single-element"):
        Tensor(np.ones(2), requires_grad=True).backward()
