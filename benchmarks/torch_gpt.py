"""The same tensor-parallel GPT in PyTorch (torch.distributed on gloo), TP written by hand.

The reference point a PyTorch user would write: the Megatron f/g operators as autograd
Functions (`CopyToTP`: identity forward / allreduce backward; `ReduceFromTP`: allreduce forward /
identity backward), a vocab-parallel embedding and cross-entropy that never gather the logits,
`F.scaled_dot_product_attention` (causal), `torch.optim.AdamW`. Weights are the raw floor's
global weights (`raw_gpt.init_full_params`) sliced the same way, so both start from the same
model. Ranks and sizes come from mpi4py; rank 0 picks a free port on 127.0.0.1 for the gloo
rendezvous (no torchrun).

  python benchmarks/torch_gpt.py --np 2 --check            # first-step loss == raw's, tp=1,2
  python benchmarks/torch_gpt.py --np 2 --preset h256      # time one step at tp = 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks import common, raw_gpt
from benchmarks.common import ModelShape

LN_EPS = raw_gpt.LN_EPS


# ---- process groups ---------------------------------------------------------------------------


def init_distributed(comm: Any) -> None:
    """Start the default gloo group over the ranks of the mpi4py communicator (once)."""
    if comm.Get_size() == 1 or dist.is_initialized():
        return
    port = common.free_port() if comm.Get_rank() == 0 else None
    port = comm.bcast(port, root=0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}",
        rank=comm.Get_rank(), world_size=comm.Get_size(),
    )


class TPGroups:
    """TP and DP torch process groups for world = dp x tp (tp fastest-varying), like mpisplit's
    ProcessGrid. Every rank creates every group (torch requires it)."""

    def __init__(self, comm: Any, tp: int) -> None:
        world, rank = comm.Get_size(), comm.Get_rank()
        if tp < 1 or world % tp:
            raise ValueError(f"tp={tp} must divide the world size {world}")
        self.tp, self.dp = tp, world // tp
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_group = self.dp_group = None
        if world == 1:
            return
        init_distributed(comm)
        for d in range(self.dp):
            g = dist.new_group([d * tp + r for r in range(tp)])
            if d == self.dp_rank:
                self.tp_group = g
        for r in range(tp):
            g = dist.new_group([d * tp + r for d in range(self.dp)])
            if r == self.tp_rank:
                self.dp_group = g


# ---- the f and g operators, vocab-parallel cross-entropy ----------------------------------------


def _allreduce(x: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


class CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce over TP (input gradient of a column split)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _allreduce(grad.contiguous().clone(), ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce over TP (output of a row split); backward: identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _allreduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split over the vocabulary: allreduce MAX of the row max,
    one allreduce SUM of [sum exp, target logit]; backward is local (saved exp and sums)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Any, v0: int,
                n_valid_cols: int, ignore_index: int) -> torch.Tensor:
        N, vl = logits.shape
        z = logits.clone()
        if n_valid_cols < vl:
            z[:, n_valid_cols:] = float("-inf")
        mx = z.max(dim=1).values
        _allreduce(mx, group, dist.ReduceOp.MAX)
        z.sub_(mx[:, None])
        tl = targets - v0
        own = (tl >= 0) & (tl < vl)
        rows = own.nonzero(as_tuple=True)[0]
        cols = tl[rows]
        sums = torch.zeros((2, N), dtype=z.dtype)
        sums[1, rows] = z[rows, cols]
        z.exp_()
        sums[0] = z.sum(dim=1)
        _allreduce(sums, group)
        valid = targets != ignore_index
        n_valid = max(1, int(valid.sum()))
        loss_i = sums[0].log() - sums[1]
        coef = valid.to(z.dtype) / n_valid
        ctx.save_for_backward(z, sums[0], coef, rows, cols)
        return (loss_i * coef).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        z, s, coef, rows, cols = ctx.saved_tensors
        dz = z.mul_((coef / s)[:, None])  # softmax * coef, in place on the saved exp
        dz[rows, cols] -= coef[rows]
        return dz.mul_(grad), None, None, None, None, None


# ---- the model --------------------------------------------------------------------------------


class TorchGPT(torch.nn.Module):
    """One rank's TP slab of the GPT; weights (in, out) like the raw floor, so no transposes
    are needed when loading the same global weights."""

    def __init__(self, shape: ModelShape, groups: TPGroups,
                 full_params: dict[str, np.ndarray] | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.shape, self.g = shape, groups
        tp = groups.tp
        self.vl = raw_gpt.padded_vocab(shape.vocab_size, tp) // tp
        self.v0 = groups.tp_rank * self.vl
        self.n_valid_cols = max(0, min(self.vl, shape.vocab_size - self.v0))
        self.p: dict[str, torch.nn.Parameter] = {}
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        for k, (name, _, kind, _) in enumerate(raw_gpt.param_specs(shape)):
            # one global float64 array at a time (peak memory near the model's own)
            full = (raw_gpt.init_full_param(shape, seed, k) if full_params is None
                    else full_params[name])
            slab = raw_gpt.shard(full, kind, shape, tp, groups.tp_rank)
            del full
            param = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(slab, np_dtype)))
            self.register_parameter(name.replace(".", "_"), param)
            self.p[name] = param

    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             ignore_index: int = raw_gpt.IGNORE_INDEX) -> torch.Tensor:
        s, p, tpg = self.shape, self.p, self.g.tp_group
        B, T = idx.shape
        N, h, hs = B * T, s.n_embd, s.head_size
        nh, hl = s.n_head // self.g.tp, s.n_embd // self.g.tp
        if self.g.tp > 1:
            lid = idx - self.v0
            own = (lid >= 0) & (lid < self.vl)
            emb = F.embedding(lid.clamp(0, self.vl - 1), p["wte"]) * own.unsqueeze(-1)
            x = ReduceFromTP.apply(emb, tpg)
        else:
            x = F.embedding(idx, p["wte"])
        x = x + p["wpe"][:T]  # (B, T, h)
        for layer in range(s.n_layer):
            q = f"h{layer}."
            a = F.layer_norm(x, (h,), p[q + "ln1_w"], p[q + "ln1_b"], LN_EPS)
            a = CopyToTP.apply(a, tpg).reshape(N, h)
            qkv = torch.addmm(p[q + "attn_b"], a, p[q + "attn_w"]).view(B, T, 3, nh, hs)
            qh, kh, vh = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            y = y.transpose(1, 2).reshape(N, hl)
            o = ReduceFromTP.apply(y @ p[q + "attn_proj_w"], tpg) + p[q + "attn_proj_b"]
            x = x + o.view(B, T, h)
            m = F.layer_norm(x, (h,), p[q + "ln2_w"], p[q + "ln2_b"], LN_EPS)
            m = CopyToTP.apply(m, tpg).reshape(N, h)
            u = F.gelu(torch.addmm(p[q + "fc_b"], m, p[q + "fc_w"]), approximate="tanh")
            z = ReduceFromTP.apply(u @ p[q + "mlp_proj_w"], tpg) + p[q + "mlp_proj_b"]
            x = x + z.view(B, T, h)
        xf = F.layer_norm(x, (h,), p["lnf_w"], p["lnf_b"], LN_EPS)
        xf = CopyToTP.apply(xf, tpg).reshape(N, h)
        logits = xf @ p["wte"].t()  # (N, vl): this rank's vocabulary slice only
        return VocabParallelCrossEntropy.apply(
            logits, targets.reshape(N), tpg, self.v0, self.n_valid_cols, ignore_index
        )


class TorchTrainer:
    """Model + AdamW + the data-parallel gradient average (one flattened all-reduce)."""

    def __init__(self, shape: ModelShape, comm: Any, tp: int, dtype: str = "float32",
                 seed: int = 0, full_params: dict[str, np.ndarray] | None = None,
                 adamw: raw_gpt.AdamWConfig | None = None, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.groups = TPGroups(comm, tp)
        tdtype = {"float32": torch.float32, "float64": torch.float64}[str(np.dtype(dtype))]
        self.model = TorchGPT(shape, self.groups, full_params, seed, tdtype)
        c = adamw or raw_gpt.AdamWConfig()
        kw: dict[str, Any] = {"lr": c.lr, "betas": (c.beta1, c.beta2), "eps": c.eps,
                              "weight_decay": c.weight_decay}
        try:  # the fused CPU kernel is the fastest torch AdamW where this torch has it
            self.opt = torch.optim.AdamW(self.model.parameters(), fused=True, **kw)
            self.adamw_impl = "fused"
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(self.model.parameters(), foreach=True, **kw)
            self.adamw_impl = "foreach"

    def train_step(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(idx, targets)
        loss.backward()
        if self.groups.dp > 1:
            grads = [p.grad for p in self.model.parameters()]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.groups.dp_group)
            flat.mul_(1.0 / self.groups.dp)
            for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(f)
        self.opt.step()
        return float(loss.detach())


def torch_batch(shape: ModelShape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx, tgt = raw_gpt.make_batch(shape, seed)
    return torch.from_numpy(idx), torch.from_numpy(tgt)


def compare_with_raw(comm: Any, tp: int, shape: ModelShape = common.TINY, steps: int = 2,
                     seed: int = 0) -> tuple[list[float], list[float]]:
    """Losses of `steps` float32 training steps of torch and raw from the same weights and
    batches (replica d uses batch seed d). Returns (torch losses, raw losses) of this rank."""
    full = raw_gpt.init_full_params(shape, seed)
    trainer = TorchTrainer(shape, comm, tp, full_params=full)
    raw = raw_gpt.RawGPT(shape, comm, tp=tp, dtype=np.float32, full_params=full)
    idx, tgt = raw_gpt.make_batch(shape, seed=raw.dp_rank)
    t_losses = [trainer.train_step(torch.from_numpy(idx), torch.from_numpy(tgt))
                for _ in range(steps)]
    r_losses = [raw.train_step(idx, tgt) for _ in range(steps)]
    raw.free()
    return t_losses, r_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare the first losses with the raw floor at every tp that fits")
    ap.add_argument("--preset", default="h256", help="model preset (h256..h2048, tiny)")
    ap.add_argument("--tp", type=int, default=None, help="TP degree (default: all ranks)")
    ap.add_argument("--steps", type=int, default=5)
    common.add_common_args(ap, default_np=2)
    args = ap.parse_args()
    common.relaunch_if_needed(args.np, args.threads, args.timeout)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    threads = common.threads_in_effect()
    torch.set_num_threads(threads)
    world, rank = comm.Get_size(), comm.Get_rank()
    if args.check or args.smoke:
        worst = 0.0
        for tp in [t for t in (1, 2, 4) if world % t == 0 and common.TINY.n_head % t == 0]:
            t_l, r_l = compare_with_raw(comm, tp)
            rel = max(abs(a - b) / abs(b) for a, b in zip(t_l, r_l))
            worst = max(worst, rel)
            if rank == 0:
                print(f"tp={tp} dp={world // tp}: torch {t_l}  raw {r_l}  max rel diff {rel:.2e}")
        worst = comm.allreduce(worst, op=MPI.MAX)
        if worst > 1e-5:
            sys.exit(f"torch and raw losses differ by {worst:.2e} (> 1e-5)")
        return
    shape = common.get_shape(args.preset)
    tp = world if args.tp is None else args.tp
    trainer = TorchTrainer(shape, comm, tp)
    idx, tgt = torch_batch(shape, seed=trainer.groups.dp_rank)
    times = common.time_steps(lambda: trainer.train_step(idx, tgt), comm, 1, args.steps)
    if rank == 0:
        med = common.summarize(times)["median_s"]
        flops = common.train_flops(shape, shape.batch * (world // tp))
        print(f"torch {shape.name} ranks={world} tp={tp}: {med * 1e3:.1f} ms/step, "
              f"{flops / med / 1e9:.2f} GFLOP/s (AdamW {trainer.adamw_impl})")


if __name__ == "__main__":
    main()
