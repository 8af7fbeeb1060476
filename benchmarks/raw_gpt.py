"""The raw floor: the tensor-parallel GPT training step in plain NumPy + mpi4py, no autograd.

Forward, backward and AdamW are written out by hand, exactly the math of the shared GPT spec
(GPT-2 block, tied vocab-parallel head, vocab-parallel cross-entropy, Megatron TP layout),
with every buffer preallocated and every elementwise op in place (`out=`). It is what the
library's step time is measured against.

Layout: world = dp x tp, tp the fastest-varying rank index. A rank holds
  wte (Vp/t, h) rows [r Vp/t, (r+1) Vp/t) of the padded vocabulary; wpe (S, h) replicated;
  per block ln1/ln2 (h) replicated, attn_w (h, 3h/t) = [Q_r | K_r | V_r] (its heads),
  attn_b (3h/t), attn_proj_w (h/t, h) rows, attn_proj_b (h) replicated, fc_w (h, 4h/t),
  fc_b (4h/t), mlp_proj_w (4h/t, h) rows, mlp_proj_b (h) replicated; lnf (h) replicated.
All parameters, gradients and AdamW moments live in four flat arrays (one view per
parameter), so AdamW is a dozen whole-array ufuncs and the data-parallel gradient average is
one Allreduce.

Communication per step over TP (t > 1): embedding 1 allreduce (N,h); per block forward 2,
backward 2 allreduces (N,h); head backward 1 allreduce (N,h); cross-entropy one MAX (N) and
one SUM (2,N) (exp-sums and target logits fused). Over DP (dp > 1): one gradient allreduce.

Run alone for a timing: `python benchmarks/raw_gpt.py --preset h256 --np 2 --tp 2`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import ModelShape

LN_EPS = 1e-5
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715
IGNORE_INDEX = -1  # targets equal to this do not count in the loss
ADAMW_CHUNK = 1 << 17  # elements per AdamW chunk: 5 arrays x 512 KiB (float32)

BLOCK_PARAMS = (
    "ln1_w", "ln1_b", "attn_w", "attn_b", "attn_proj_w", "attn_proj_b",
    "ln2_w", "ln2_b", "fc_w", "fc_b", "mlp_proj_w", "mlp_proj_b",
)


# ---- global weights and their slabs -----------------------------------------------------------


def param_specs(shape: ModelShape) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, global shape, split kind, init std) per parameter, in a fixed order.

    Split kinds: "vocab" (rows of the padded vocabulary), "qkv" (columns of each of Q, K, V by
    heads), "col" (columns / a column-split bias), "row" (rows), "rep" (replicated).
    Init std: 0 -> zeros, -1 -> ones (LayerNorm weight).
    """
    h, V, S, L = shape.n_embd, shape.vocab_size, shape.block_size, shape.n_layer
    proj_std = 0.02 / math.sqrt(2 * L)
    specs: list[tuple[str, tuple[int, ...], str, float]] = [
        ("wte", (V, h), "vocab", 0.02),
        ("wpe", (S, h), "rep", 0.02),
    ]
    for layer in range(L):
        p = f"h{layer}."
        specs += [
            (p + "ln1_w", (h,), "rep", -1.0),
            (p + "ln1_b", (h,), "rep", 0.0),
            (p + "attn_w", (h, 3 * h), "qkv", 0.02),
            (p + "attn_b", (3 * h,), "qkv", 0.0),
            (p + "attn_proj_w", (h, h), "row", proj_std),
            (p + "attn_proj_b", (h,), "rep", 0.0),
            (p + "ln2_w", (h,), "rep", -1.0),
            (p + "ln2_b", (h,), "rep", 0.0),
            (p + "fc_w", (h, 4 * h), "col", 0.02),
            (p + "fc_b", (4 * h,), "col", 0.0),
            (p + "mlp_proj_w", (4 * h, h), "row", proj_std),
            (p + "mlp_proj_b", (h,), "rep", 0.0),
        ]
    specs += [("lnf_w", (h,), "rep", -1.0), ("lnf_b", (h,), "rep", 0.0)]
    return specs


def init_full_param(shape: ModelShape, seed: int, k: int) -> np.ndarray:
    """Global float64 value of parameter k of `param_specs(shape)`, drawn from its own
    generator seeded (seed, k): independent of the TP degree and of which rank builds it."""
    _, gshape, _, std = param_specs(shape)[k]
    if std == 0.0:
        return np.zeros(gshape)
    if std == -1.0:
        return np.ones(gshape)
    return np.random.default_rng([seed, k]).normal(0.0, std, size=gshape)


def init_full_params(shape: ModelShape, seed: int = 0) -> dict[str, np.ndarray]:
    """All global float64 weights (see init_full_param)."""
    return {spec[0]: init_full_param(shape, seed, k)
            for k, spec in enumerate(param_specs(shape))}


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def shard(full: np.ndarray, kind: str, shape: ModelShape, tp: int, rank: int) -> np.ndarray:
    """This TP rank's slab of a global array (a copy)."""
    h = shape.n_embd
    if kind == "rep":
        return full.copy()
    if kind == "vocab":
        vl = padded_vocab(shape.vocab_size, tp) // tp
        out = np.zeros((vl,) + full.shape[1:], dtype=full.dtype)
        lo, hi = rank * vl, min((rank + 1) * vl, full.shape[0])
        if hi > lo:
            out[: hi - lo] = full[lo:hi]
        return out
    if kind == "qkv":  # last axis = [Q | K | V], each h wide; take this rank's heads of each
        w = h // tp
        return np.concatenate(
            [full[..., j * h + rank * w: j * h + (rank + 1) * w] for j in range(3)], axis=-1
        )
    if kind == "col":
        w = full.shape[-1] // tp
        return full[..., rank * w:(rank + 1) * w].copy()
    if kind == "row":
        w = full.shape[0] // tp
        return full[rank * w:(rank + 1) * w].copy()
    raise ValueError(f"unknown split kind {kind!r}")


def unshard(slabs: list[np.ndarray], kind: str, shape: ModelShape) -> np.ndarray:
    """Inverse of `shard`: the global array from the slabs of TP ranks 0..t-1."""
    tp, h = len(slabs), shape.n_embd
    if kind == "rep":
        return slabs[0].copy()
    if kind == "vocab":
        return np.concatenate(slabs, axis=0)[: shape.vocab_size]
    if kind == "qkv":
        w = h // tp
        parts = [s[..., j * w:(j + 1) * w] for j in range(3) for s in slabs]
        return np.concatenate(parts, axis=-1)
    if kind == "col":
        return np.concatenate(slabs, axis=-1)
    if kind == "row":
        return np.concatenate(slabs, axis=0)
    raise ValueError(f"unknown split kind {kind!r}")


# ---- the model --------------------------------------------------------------------------------


@dataclass
class AdamWConfig:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to every parameter (one torch.optim.AdamW group)


class _Layer:
    """Per-layer saved activations (N = B*T tokens, nh local heads, hl = h/t)."""

    def __init__(self, B: int, T: int, h: int, nh: int, hs: int, dt: np.dtype) -> None:
        N, hl = B * T, nh * hs
        e = np.empty
        self.xhat1, self.rstd1, self.a = e((N, h), dt), e((N, 1), dt), e((N, h), dt)
        self.q, self.k, self.v = (e((B, nh, T, hs), dt) for _ in range(3))  # (B, nh, T, hs)
        self.att = e((B, nh, T, T), dt)  # softmax probabilities
        self.y = e((N, hl), dt)  # attention output, tokens x local heads
        self.xhat2, self.rstd2, self.m = e((N, h), dt), e((N, 1), dt), e((N, h), dt)
        self.u, self.th, self.g = (e((N, 4 * hl), dt) for _ in range(3))  # fc out, tanh, gelu


class _Workspace:
    """All activation and scratch buffers for one (B, T)."""

    def __init__(self, shape: ModelShape, B: int, T: int, tp: int, dt: np.dtype) -> None:
        h, nh, hs = shape.n_embd, shape.n_head // tp, shape.head_size
        N, hl, vl = B * T, h // tp, padded_vocab(shape.vocab_size, tp) // tp
        e = np.empty
        self.B, self.T, self.N = B, T, N
        self.layers = [_Layer(B, T, h, nh, hs, dt) for _ in range(shape.n_layer)]
        self.x = e((N, h), dt)  # residual stream
        self.xhat_f, self.rstd_f, self.xf = e((N, h), dt), e((N, 1), dt), e((N, h), dt)
        self.logits = e((N, vl), dt)  # becomes exp(z - max), then dlogits, in place
        self.mx = e((N,), dt)
        self.sums = e((2, N), dt)  # [sum exp, target logit - max]
        self.loss_i = e((N,), dt)
        # scratch, shared by all layers
        self.h1, self.h2, self.h3 = e((N, h), dt), e((N, h), dt), e((N, h), dt)
        self.dx = e((N, h), dt)  # gradient of the residual stream
        self.qkv = e((N, 3 * hl), dt)
        self.yh = e((B, nh, T, hs), dt)
        self.hs1, self.hs2 = e((B, nh, T, hs), dt), e((B, nh, T, hs), dt)
        self.tt1, self.tt2 = e((B, nh, T, T), dt), e((B, nh, T, T), dt)
        self.rowsT = e((B, nh, T, 1), dt)
        self.f1, self.f2 = e((N, 4 * hl), dt), e((N, 4 * hl), dt)
        self.yl = e((N, hl), dt)
        self.col = e((N, 1), dt)
        self.ones = np.ones(N, dtype=dt)
        # additive causal mask: 0 on and below the diagonal, -inf above
        self.mask = np.triu(np.full((T, T), -np.inf, dtype=dt), k=1)


class RawGPT:
    """One data-parallel replica's TP slab of the GPT, with a hand-written training step.

    `comm` is the world mpi4py communicator (world size = dp * tp). Weights come from
    `init_full_params(shape, seed)` (or `full_params`, global float64 arrays) sliced to this
    rank, so every tp gives the same model.
    """

    def __init__(
        self,
        shape: ModelShape,
        comm: Any,
        tp: int = 1,
        dtype: Any = np.float32,
        seed: int = 0,
        adamw: AdamWConfig | None = None,
        full_params: dict[str, np.ndarray] | None = None,
    ) -> None:
        from mpi4py import MPI

        world = comm.Get_size()
        if tp < 1 or world % tp:
            raise ValueError(f"tp={tp} must divide the world size {world}")
        if shape.n_head % tp:
            raise ValueError(f"tp={tp} must divide n_head={shape.n_head}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.shape, self.tp, self.dp = shape, tp, world // tp
        rank = comm.Get_rank()
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_comm = comm.Split(color=self.dp_rank, key=self.tp_rank)
        self.dp_comm = comm.Split(color=self.tp_rank, key=self.dp_rank)
        self._MPI = MPI
        self.adamw = adamw or AdamWConfig()
        self.vl = padded_vocab(shape.vocab_size, tp) // tp
        self.v0 = self.tp_rank * self.vl
        # local columns >= n_valid are padding (global index >= V)
        self.n_valid_cols = max(0, min(self.vl, shape.vocab_size - self.v0))

        self.specs = param_specs(shape)
        local = {}
        for k, (name, _, kind, _) in enumerate(self.specs):
            # one global float64 array at a time, so peak memory stays near the model's own
            full = init_full_param(shape, seed, k) if full_params is None else full_params[name]
            local[name] = shard(full, kind, shape, tp, self.tp_rank).astype(self.dtype)
            del full
        total = sum(a.size for a in local.values())
        self.flat_p = np.empty(total, self.dtype)
        self.flat_g = np.zeros(total, self.dtype)
        self.flat_m = np.zeros(total, self.dtype)
        self.flat_v = np.zeros(total, self.dtype)
        self.flat_s = np.empty(min(total, ADAMW_CHUNK), self.dtype)  # AdamW scratch
        self.p: dict[str, np.ndarray] = {}
        self.g: dict[str, np.ndarray] = {}
        off = 0
        for name, _, _, _ in self.specs:
            a = local[name]
            self.p[name] = self.flat_p[off:off + a.size].reshape(a.shape)
            self.p[name][...] = a
            self.g[name] = self.flat_g[off:off + a.size].reshape(a.shape)
            off += a.size
        self.step_count = 0
        self._ws: _Workspace | None = None

    # -- helpers --

    def _ws_for(self, B: int, T: int) -> _Workspace:
        if self._ws is None or (self._ws.B, self._ws.T) != (B, T):
            self._ws = None  # free the old buffers first
            self._ws = _Workspace(self.shape, B, T, self.tp, self.dtype)
        return self._ws

    def _allreduce_tp(self, buf: np.ndarray, op: Any = None) -> None:
        if self.tp > 1:
            self.tp_comm.Allreduce(self._MPI.IN_PLACE, buf, op=op or self._MPI.SUM)

    @staticmethod
    def _ln_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, xhat: np.ndarray,
                    rstd: np.ndarray, out: np.ndarray) -> None:
        # xhat = (x - mean) / sqrt(var + eps); out = xhat * w + b; var biased, over the last axis
        h = x.shape[1]
        np.mean(x, axis=1, keepdims=True, out=rstd)
        np.subtract(x, rstd, out=xhat)
        np.einsum("ij,ij->i", xhat, xhat, out=rstd[:, 0])
        rstd *= 1.0 / h
        rstd += LN_EPS
        np.sqrt(rstd, out=rstd)
        np.reciprocal(rstd, out=rstd)
        xhat *= rstd
        np.multiply(xhat, w, out=out)
        out += b

    def _ln_backward(self, dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, w: np.ndarray,
                     gw: np.ndarray, gb: np.ndarray, dx_acc: np.ndarray,
                     ws: _Workspace) -> None:
        # dxhat = dy * w;  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat));
        # gw = sum_n dy * xhat;  gb = sum_n dy;  dx is added to dx_acc (the residual gradient)
        h = dy.shape[1]
        t = ws.h3
        np.multiply(dy, xhat, out=t)
        np.matmul(ws.ones, t, out=gw)
        np.matmul(ws.ones, dy, out=gb)
        np.multiply(dy, w, out=t)  # dxhat
        c1 = ws.col
        np.einsum("ij,ij->i", t, xhat, out=c1[:, 0])
        c1 *= -1.0 / h
        # t - xhat * mean(dxhat*xhat) - mean(dxhat)
        dx = ws.h2
        np.multiply(xhat, c1, out=dx)
        dx += t
        np.mean(t, axis=1, keepdims=True, out=c1)
        dx -= c1
        dx *= rstd
        dx_acc += dx

    # -- the step --

    def _forward(self, idx: np.ndarray, targets: np.ndarray) -> float:
        s = self.shape
        B, T = idx.shape
        if T > s.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {s.block_size}")
        ws = self._ws_for(B, T)
        p, h, hs = self.p, s.n_embd, s.head_size
        nh = s.n_head // self.tp
        N = B * T
        ids = idx.reshape(N)
        if ids.size and (ids.min() < 0 or ids.max() >= s.vocab_size):
            raise ValueError(f"token ids must be in [0, {s.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")

        # embedding: vocab-parallel lookup (rows outside this rank's range are 0), allreduce
        x = ws.x
        if self.tp > 1:
            lid = ids - self.v0
            own = (lid >= 0) & (lid < self.vl)
            np.take(p["wte"], np.where(own, lid, 0), axis=0, out=x, mode="clip")
            x[~own] = 0.0
            self._allreduce_tp(x)
        else:
            np.take(p["wte"], ids, axis=0, out=x, mode="clip")  # ids checked above
        x.reshape(B, T, h)[...] += p["wpe"][:T]

        scale = 1.0 / math.sqrt(hs)
        for layer, sv in enumerate(ws.layers):
            q = f"h{layer}."
            # attention: a = LN1(x); qkv = a W + b (N, 3hl); heads -> (B, nh, T, hs)
            self._ln_forward(x, p[q + "ln1_w"], p[q + "ln1_b"], sv.xhat1, sv.rstd1, sv.a)
            np.matmul(sv.a, p[q + "attn_w"], out=ws.qkv)
            ws.qkv += p[q + "attn_b"]
            qkv5 = ws.qkv.reshape(B, T, 3, nh, hs)
            np.copyto(sv.q, qkv5[:, :, 0].transpose(0, 2, 1, 3))
            np.copyto(sv.k, qkv5[:, :, 1].transpose(0, 2, 1, 3))
            np.copyto(sv.v, qkv5[:, :, 2].transpose(0, 2, 1, 3))
            att = sv.att  # (B, nh, T, T)
            np.matmul(sv.q, sv.k.transpose(0, 1, 3, 2), out=att)
            att *= scale
            att += ws.mask
            np.max(att, axis=-1, keepdims=True, out=ws.rowsT)
            att -= ws.rowsT
            np.exp(att, out=att)
            np.sum(att, axis=-1, keepdims=True, out=ws.rowsT)
            att /= ws.rowsT
            np.matmul(att, sv.v, out=ws.yh)  # (B, nh, T, hs)
            np.copyto(sv.y.reshape(B, T, nh, hs), ws.yh.transpose(0, 2, 1, 3))
            o = ws.h1
            np.matmul(sv.y, p[q + "attn_proj_w"], out=o)  # partial sum over heads
            self._allreduce_tp(o)
            o += p[q + "attn_proj_b"]
            x += o
            # MLP: m = LN2(x); u = m W_fc + b; g = gelu_tanh(u); z = g W_p (partial) -> allreduce
            self._ln_forward(x, p[q + "ln2_w"], p[q + "ln2_b"], sv.xhat2, sv.rstd2, sv.m)
            np.matmul(sv.m, p[q + "fc_w"], out=sv.u)
            sv.u += p[q + "fc_b"]
            th = sv.th  # tanh(c (u + a u^3))
            np.multiply(sv.u, sv.u, out=th)
            th *= GELU_A
            th += 1.0
            th *= sv.u
            th *= GELU_C
            np.tanh(th, out=th)
            np.add(th, 1.0, out=sv.g)
            sv.g *= sv.u
            sv.g *= 0.5
            z = ws.h1
            np.matmul(sv.g, p[q + "mlp_proj_w"], out=z)
            self._allreduce_tp(z)
            z += p[q + "mlp_proj_b"]
            x += z

        self._ln_forward(x, p["lnf_w"], p["lnf_b"], ws.xhat_f, ws.rstd_f, ws.xf)
        # tied head on this rank's vocabulary rows: (N, h) @ (h, vl)
        z = ws.logits
        np.matmul(ws.xf, p["wte"].T, out=z)
        if self.n_valid_cols < self.vl:
            z[:, self.n_valid_cols:] = -np.inf  # padded vocabulary never wins or counts
        # vocab-parallel cross-entropy: global row max, then sum of exp and the target logit
        np.max(z, axis=1, out=ws.mx)
        self._allreduce_tp(ws.mx, self._MPI.MAX)
        z -= ws.mx[:, None]
        tg = targets.reshape(N)
        tl = tg - self.v0
        self._own_t = own_t = (tl >= 0) & (tl < self.vl)
        self._rows_t = rows = np.nonzero(own_t)[0]
        self._cols_t = cols = tl[rows]
        ws.sums[1] = 0.0
        ws.sums[1, rows] = z[rows, cols]
        np.exp(z, out=z)
        np.sum(z, axis=1, out=ws.sums[0])
        self._allreduce_tp(ws.sums)
        # loss_n = log(sum exp(z - max)) - (z_target - max)
        valid = tg != IGNORE_INDEX
        self._n_valid = n_valid = max(1, int(valid.sum()))
        self._valid = valid
        np.log(ws.sums[0], out=ws.loss_i)
        ws.loss_i -= ws.sums[1]
        return float(ws.loss_i[valid].sum() / n_valid)

    def _backward(self, idx: np.ndarray) -> None:
        ws = self._ws
        assert ws is not None
        s, p, g = self.shape, self.p, self.g
        B, T, N = ws.B, ws.T, ws.N
        h, hs = s.n_embd, s.head_size
        nh = s.n_head // self.tp

        # d loss / d logits = (softmax - onehot(target)) * valid / n_valid, in place on ws.logits
        z = ws.logits
        coef, w = ws.sums[1], ws.sums[0]  # coef = valid / n_valid;  w = coef / sum exp
        if self._valid.all():
            coef[...] = 1.0 / self._n_valid
        else:
            np.multiply(self._valid, 1.0 / self._n_valid, out=coef)
        np.divide(coef, w, out=w)
        z *= w[:, None]
        z[self._rows_t, self._cols_t] -= coef[self._rows_t]
        # head: d wte = dlogits^T xf (written), d xf = dlogits wte (partial over vocab) -> allreduce
        np.matmul(z.T, ws.xf, out=g["wte"])
        dxf = ws.h1
        np.matmul(z, p["wte"], out=dxf)
        self._allreduce_tp(dxf)
        dx = ws.dx
        dx[...] = 0.0
        self._ln_backward(dxf, ws.xhat_f, ws.rstd_f, p["lnf_w"], g["lnf_w"], g["lnf_b"], dx, ws)

        scale = 1.0 / math.sqrt(hs)
        for layer in reversed(range(s.n_layer)):
            sv, q = ws.layers[layer], f"h{layer}."
            # MLP backward; dz = dx (the residual passes the gradient through unchanged)
            np.matmul(ws.ones, dx, out=g[q + "mlp_proj_b"])
            np.matmul(sv.g.T, dx, out=g[q + "mlp_proj_w"])
            dgl = ws.f1
            np.matmul(dx, p[q + "mlp_proj_w"].T, out=dgl)
            # gelu'(u) = 0.5 (1 + th) + 0.5 u (1 - th^2) c (1 + 3 a u^2)
            t1, t2 = ws.f2, sv.g  # sv.g is no longer needed: reuse it as scratch
            np.multiply(sv.th, sv.th, out=t1)
            np.subtract(1.0, t1, out=t1)
            np.multiply(sv.u, sv.u, out=t2)
            t2 *= 3.0 * GELU_A
            t2 += 1.0
            t2 *= GELU_C
            t1 *= t2
            t1 *= sv.u
            t1 += sv.th
            t1 += 1.0
            t1 *= 0.5
            dgl *= t1  # du
            np.matmul(ws.ones, dgl, out=g[q + "fc_b"])
            np.matmul(sv.m.T, dgl, out=g[q + "fc_w"])
            dm = ws.h1
            np.matmul(dgl, p[q + "fc_w"].T, out=dm)
            self._allreduce_tp(dm)  # f operator: the column split's input gradient
            self._ln_backward(dm, sv.xhat2, sv.rstd2, p[q + "ln2_w"], g[q + "ln2_w"],
                              g[q + "ln2_b"], dx, ws)

            # attention backward
            np.matmul(ws.ones, dx, out=g[q + "attn_proj_b"])
            np.matmul(sv.y.T, dx, out=g[q + "attn_proj_w"])
            np.matmul(dx, p[q + "attn_proj_w"].T, out=ws.yl)  # dy (N, hl)
            dyh = ws.hs1
            np.copyto(dyh, ws.yl.reshape(B, T, nh, hs).transpose(0, 2, 1, 3))
            dqkv5 = ws.qkv.reshape(B, T, 3, nh, hs)
            # dv = att^T dy
            np.matmul(sv.att.transpose(0, 1, 3, 2), dyh, out=ws.hs2)
            np.copyto(dqkv5[:, :, 2], ws.hs2.transpose(0, 2, 1, 3))
            # datt = dy v^T; dscores = att * (datt - rowsum(datt * att)) * scale
            datt = ws.tt1
            np.matmul(dyh, sv.v.transpose(0, 1, 3, 2), out=datt)
            np.multiply(datt, sv.att, out=ws.tt2)
            np.sum(ws.tt2, axis=-1, keepdims=True, out=ws.rowsT)
            datt -= ws.rowsT
            datt *= sv.att
            datt *= scale
            np.matmul(datt, sv.k, out=ws.hs2)  # dq
            np.copyto(dqkv5[:, :, 0], ws.hs2.transpose(0, 2, 1, 3))
            np.matmul(datt.transpose(0, 1, 3, 2), sv.q, out=ws.hs2)  # dk
            np.copyto(dqkv5[:, :, 1], ws.hs2.transpose(0, 2, 1, 3))
            np.matmul(ws.ones, ws.qkv, out=g[q + "attn_b"])
            np.matmul(sv.a.T, ws.qkv, out=g[q + "attn_w"])
            da = ws.h1
            np.matmul(ws.qkv, p[q + "attn_w"].T, out=da)
            self._allreduce_tp(da)  # f operator
            self._ln_backward(da, sv.xhat1, sv.rstd1, p[q + "ln1_w"], g[q + "ln1_w"],
                              g[q + "ln1_b"], dx, ws)

        # embeddings: d wpe[:T] = sum over the batch; d wte rows += dx of the tokens this rank owns
        gp = g["wpe"]
        np.sum(dx.reshape(B, T, h), axis=0, out=gp[:T])
        gp[T:] = 0.0
        ids = idx.reshape(N)
        lid = ids - self.v0
        if self.tp > 1:
            keep = np.nonzero((lid >= 0) & (lid < self.vl))[0]
            lid = lid[keep]
        else:
            keep = None
        if lid.size:
            # sum the rows of equal ids (sort + reduceat), then one fancy-indexed add
            order = np.argsort(lid, kind="stable")
            sorted_ids = lid[order]
            starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
            rows = order if keep is None else keep[order]
            g["wte"][sorted_ids[starts]] += np.add.reduceat(dx[rows], starts, axis=0)

    def loss_and_grads(self, idx: np.ndarray, targets: np.ndarray) -> float:
        """Forward and backward on this replica's batch; gradients in `self.g` (not averaged
        over DP). Returns the loss (mean over the non-ignored targets)."""
        loss = self._forward(idx, targets)
        self._backward(idx)
        return loss

    def forward_loss(self, idx: np.ndarray, targets: np.ndarray) -> float:
        return self._forward(idx, targets)

    def allreduce_grads_dp(self) -> None:
        """Average the gradients over the data-parallel replicas (one Allreduce)."""
        if self.dp > 1:
            self.dp_comm.Allreduce(self._MPI.IN_PLACE, self.flat_g, op=self._MPI.SUM)
            self.flat_g *= 1.0 / self.dp

    def adamw_step(self) -> None:
        """torch.optim.AdamW's update on the flat arrays: decoupled decay, bias correction.

        Processed in chunks that stay in cache across the dozen passes (about a third faster
        than whole-array passes, which are memory-bound).
        """
        c = self.adamw
        self.step_count += 1
        bc1 = 1.0 - c.beta1**self.step_count
        bc2 = 1.0 - c.beta2**self.step_count
        # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = step * m / (sqrt(v) + eps*sqrt(bc2))
        step = c.lr * math.sqrt(bc2) / bc1
        eps = c.eps * math.sqrt(bc2)
        decay = 1.0 - c.lr * c.weight_decay
        size = self.flat_p.size
        for lo in range(0, size, ADAMW_CHUNK):
            hi = min(size, lo + ADAMW_CHUNK)
            p, g = self.flat_p[lo:hi], self.flat_g[lo:hi]
            m, v, s = self.flat_m[lo:hi], self.flat_v[lo:hi], self.flat_s[: hi - lo]
            m *= c.beta1
            np.multiply(g, 1.0 - c.beta1, out=s)
            m += s
            v *= c.beta2
            np.multiply(g, g, out=s)
            s *= 1.0 - c.beta2
            v += s
            p *= decay
            np.sqrt(v, out=s)
            s += eps
            np.divide(m, s, out=s)
            s *= step
            p -= s

    def train_step(self, idx: np.ndarray, targets: np.ndarray) -> float:
        """Forward, backward, DP gradient average, AdamW. Returns this replica's loss."""
        loss = self.loss_and_grads(idx, targets)
        self.allreduce_grads_dp()
        self.adamw_step()
        return loss

    # -- test support --

    def gather_full(self, which: str = "grad") -> dict[str, np.ndarray]:
        """Global arrays of the parameters ("param") or gradients ("grad"), assembled from the
        TP slabs on every rank (pickle collectives: for tests, not for hot paths)."""
        src = self.g if which == "grad" else self.p
        out = {}
        for name, _, kind, _ in self.specs:
            slabs = self.tp_comm.allgather(np.ascontiguousarray(src[name]))
            out[name] = unshard(slabs, kind, self.shape)
        return out

    def free(self) -> None:
        self.tp_comm.Free()
        self.dp_comm.Free()


def make_batch(shape: ModelShape, seed: int, batch: int | None = None,
               seq: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and next-token targets (int64, (B, T)), identical on every rank that
    passes the same seed."""
    B = shape.batch if batch is None else batch
    T = shape.seq if seq is None else seq
    rng = np.random.default_rng([seed, 1234])
    toks = rng.integers(0, shape.vocab_size, size=(B, T + 1), dtype=np.int64)
    return np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])


def raw_step_time(shape: ModelShape, tp: int, comm: Any, steps: int = 5,
                  dtype: Any = np.float32, warmup: int = 1) -> dict[str, float]:
    """Median (and min/max) seconds of the raw training step at TP degree `tp` on `comm`
    (dp = comm size / tp; each replica its own batch). Times are the slowest rank's."""
    model = RawGPT(shape, comm, tp=tp, dtype=dtype)
    idx, tgt = make_batch(shape, seed=model.dp_rank)
    times = common.time_steps(lambda: model.train_step(idx, tgt), comm, warmup, steps)
    model.free()
    return common.summarize(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="h256", help="model preset (h256..h2048, tiny)")
    ap.add_argument("--tp", type=int, default=None, help="TP degree (default: all ranks)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    common.add_common_args(ap, default_np=1)
    args = ap.parse_args()
    common.relaunch_if_needed(args.np, args.threads, args.timeout)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    shape = common.TINY if args.smoke else common.get_shape(args.preset)
    tp = comm.Get_size() if args.tp is None else args.tp
    r = raw_step_time(shape, tp, comm, steps=2 if args.smoke else args.steps, dtype=args.dtype)
    if comm.Get_rank() == 0:
        flops = common.train_flops(shape, shape.batch * (comm.Get_size() // tp))
        print(f"raw {shape.name} ranks={comm.Get_size()} tp={tp} {args.dtype}: "
              f"{r['median_s'] * 1e3:.1f} ms/step, {flops / r['median_s'] / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
