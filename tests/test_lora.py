"""LoRA under tensor parallelism against PEFT + transformers, tiny random Llama and Qwen2 models
in float64.

Reference: transformers' model (in full float64: tests/test_llama_hf.py) with PEFT's adapters on every projection (the same A and B, both
non-zero), one process: the logits, the loss and every adapter gradient, and the adapters after
one SGD step and after one AdamW step of torch's optimizers. Ours at every dp x pp x tp layout the world allows, with
and without sequence parallelism (tp 4 replicates the Llama model's 2 KV heads): to 1e-10. The
base weights are frozen: no gradient, not in the optimizer. Packed: each row holds two
sequences (nn/packing.py), which PEFT runs one at a time.
"""

from __future__ import annotations

import _dense_llama as dense
import numpy as np
import pytest
from _mpi import max_rel
from mpi4py import MPI

from mpisplit.models.gpt import GPT
from mpisplit.models.hf_layout import hf_name
from mpisplit.models.lora import apply_lora
from mpisplit.nn.lora import TARGETS, LoraConfig
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import SGD, AdamW, average_gradients
from mpisplit.training.step import StepRunner

pytestmark = pytest.mark.mpi
R, ALPHA, B, T = 4, 8.0, 12, 8
LR, WD = 1e-2, 0.1


def peft_name(ours: str) -> str:
    """h.0.attn.q_proj.lora.a -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"""
    module, leaf = ours.split(".lora.")
    base = hf_name(f"{module}.weight")[0].removesuffix(".weight")
    return f"base_model.model.{base}.lora_{leaf.upper()}.default.weight"


def gather(p, comm, data=False):
    """The full array of a slab (its gradient when it has one, unless `data`) over the TP group,
    replicated slabs (KV heads) placed once."""
    local = np.ascontiguousarray(p.grad if p.grad is not None and not data else p.data).reshape(p.view_shape)
    if p.split_axis is None or comm.size == 1:
        return local
    slabs = comm.allgather(local[None], axis=0)
    starts = comm.allgather(np.array([p.start]), axis=0)
    out = np.zeros(p.global_shape)
    n = p.view_shape[p.split_axis]
    for slab, start in zip(slabs, starts):
        where = [slice(None)] * out.ndim
        real = min(n, p.global_shape[p.split_axis] - start)
        where[p.split_axis] = slice(start, start + real)
        src = [slice(None)] * out.ndim
        src[p.split_axis] = slice(0, real)
        out[tuple(where)] = slab[tuple(src)]
    return out


SPLIT = 3  # packed: each row holds two sequences, columns 0..2 and 3..T-1, positions from 0 in each


def _pieces(idx, targets, packed):
    """The sequences PEFT runs: the rows whole, or each row's two packed sequences alone."""
    if not packed:
        return [(idx, targets)]
    return [(idx[:, :SPLIT], targets[:, :SPLIT]), (idx[:, SPLIT:], targets[:, SPLIT:])]


def positions(packed):
    row = np.concatenate([np.arange(SPLIT), np.arange(T - SPLIT)]) if packed else np.arange(T)
    return np.tile(row, (B, 1))


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", False), ("llama", True)],
                ids=["llama", "qwen2", "llama-packed"])
def case(request, tmp_path_factory):
    """The folder, the adapters' global arrays (ours: A (in, r), B (r, out)), a batch and the
    reference from PEFT: logits, loss (summed cross-entropy / the number of targets), adapter
    gradients, adapters after one SGD step (momentum, weight decay) and after one AdamW step. Packed: PEFT runs each packed sequence alone."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import (  # transformers in full float64 (its RMSNorm and rotary tables)
        _hf,
        _ours,
    )

    family, packed = request.param
    c = dense.FAMILIES[family]
    folder = tmp_path_factory.mktemp(f"lora-{family}") / "model"
    dense.write_folder(folder, c, dense.arrays(c, seed=4))
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        shapes = {n: p.global_shape for n, p in _adapted(folder, g).named_parameters() if ".lora." in n}
    rng = np.random.default_rng(9)
    adapters = {n: rng.standard_normal(s) * 0.3 for n, s in shapes.items()}
    idx, targets = np.random.default_rng(2).integers(0, c["vocab_size"], size=(2, B, T))
    model = peft.get_peft_model(_hf(folder, _ours(folder)), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)).to(torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, a in adapters.items():
            params[peft_name(n)].copy_(torch.as_tensor(a.T))
    logits, loss = [], 0.0
    for ids, tgt in _pieces(idx, targets, packed):
        out = model(input_ids=torch.as_tensor(ids)).logits
        logits.append(out.detach().numpy())
        loss = loss + torch.nn.functional.cross_entropy(out.reshape(-1, c["vocab_size"]), torch.as_tensor(tgt).reshape(-1),
                                                        reduction="sum") / targets.size
    loss.backward()
    grads = {n: params[peft_name(n)].grad.numpy().T.copy() for n in adapters}
    copies = {n: params[peft_name(n)].detach().clone().requires_grad_() for n in adapters}
    for n, t in copies.items():
        t.grad = params[peft_name(n)].grad.clone()
    torch.optim.SGD(list(copies.values()), lr=LR, momentum=0.9, weight_decay=WD).step()
    trainable = [params[peft_name(n)] for n in adapters]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.99), eps=1e-8, weight_decay=WD)
    opt.step()
    stepped = {"sgd": {n: t.detach().numpy().T.copy() for n, t in copies.items()},
               "adamw": {n: params[peft_name(n)].detach().numpy().T.copy() for n in adapters}}
    return folder, adapters, idx, targets, packed, np.concatenate(logits, axis=1), loss.item(), grads, stepped


def _adapted(folder, grid, **options):
    model = GPT.from_pretrained(folder, grid, dtype="float64", **options)
    apply_lora(model, LoraConfig(rank=R, alpha=ALPHA), seed=0)
    return model


def _layouts(size):
    out = []
    for tp in (1, 2, 4):
        for pp in (1, 2):
            if size % (tp * pp) == 0 and B % (size // (tp * pp)) == 0:
                out += [(tp, size // (tp * pp), pp, sp) for sp in ((False, True) if tp > 1 else (False,))]
    return out


def test_every_layout_equals_peft(case):
    folder, adapters, idx, targets, packed, ref_logits, ref_loss, ref_grads, ref_stepped = case
    layouts = _layouts(MPI.COMM_WORLD.size)
    assert layouts
    pos = positions(packed)
    for tp, dp, pp, sp in layouts:
        with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
            model = _adapted(folder, grid)
            model.sequence_parallel = sp
            lora = {n: p for n, p in model.named_parameters() if ".lora." in n}
            assert all(not p.requires_grad for n, p in model.named_parameters() if n not in lora)
            for n, p in lora.items():
                p.data[...] = p.slab_of(adapters[n])
            if pp == 1 and not sp:
                assert max_rel(model(idx, pos if packed else None).data, ref_logits) < 1e-10, (tp, dp)
            rows = slice(grid.dp_rank * (B // dp), (grid.dp_rank + 1) * (B // dp))
            loss = StepRunner(model, grid, 1, synchronous=True).forward_backward(
                idx[rows], targets[rows], positions=pos[rows] if packed else None)
            average_gradients(model.parameters(), grid.dp_comm)
            loss = float(grid.dp_comm.allreduce(np.array([loss]))[0]) / dp
            assert abs(loss - ref_loss) < 1e-12 * ref_loss, (tp, dp, pp, sp)
            assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
            for n, p in lora.items():
                assert max_rel(gather(p, grid.tp_comm), ref_grads[n]) < 1e-10, (tp, dp, pp, sp, n)
            start = {n: p.data.copy() for n, p in lora.items()}
            for name, opt in (("sgd", SGD(list(lora.values()), lr=LR, momentum=0.9, weight_decay=WD)),
                              ("adamw", AdamW(list(lora.values()), lr=LR, betas=(0.9, 0.99), eps=1e-8,
                                              weight_decay=WD))):
                for n, p in lora.items():
                    p.data[...] = start[n]
                opt.step()
                for n, p in lora.items():
                    assert max_rel(gather(p, grid.tp_comm, data=True), ref_stepped[name][n]) < 1e-10, (
                        name, tp, dp, pp, sp, n)


P = 0.25  # LoRA dropout


def _record_masks(monkeypatch, model):
    """Wrap LoRA._drop: each adapter's keep-mask of this forward (out != 0 where x is dense
    random), by the adapter's parameter-name prefix, with the layout it was drawn in."""
    from mpisplit.nn.lora import LoRA

    names = {id(m): n.removesuffix(".lora.a") for n, p in model.named_parameters() if n.endswith(".lora.a")
             for m in model.modules() if isinstance(m, LoRA) and m.a is p}
    masks, original = {}, LoRA._drop

    def drop(self, x, rngs, stream):
        out = original(self, x, rngs, stream)
        assert np.all(x.data != 0)
        masks[names[id(self)]] = (out.data != 0, self.row, stream)
        return out

    monkeypatch.setattr(LoRA, "_drop", drop)
    return masks


def _global_masks(masks, grid, sp):
    """The masks of the whole batch and every projection, on every rank: a column adapter's mask
    is the same on every TP rank (checked) or a sequence block (SP), a row adapter's a block of
    the input features; DP ranks hold blocks of rows, pipeline stages their own blocks."""
    out = {}
    for name, (keep, row, stream) in sorted(masks.items()):
        assert stream == (1 if row or sp else 0), name  # replicated inputs draw from the shared stream
        parts = grid.tp_comm.mpi.allgather(keep)
        if row:
            keep = np.concatenate(parts, axis=2)
        elif sp:
            keep = np.concatenate(parts, axis=1)
        else:
            assert all(np.array_equal(p, keep) for p in parts), name
        out[name] = np.concatenate(grid.dp_comm.mpi.allgather(keep), axis=0)
    for stage in grid.pp_comm.mpi.allgather(out):
        out.update(stage)
    return out


def test_dropout_equals_peft_with_the_same_masks(monkeypatch, tmp_path):
    """--lora-dropout: at every layout, training with the adapters' dropout equals PEFT + transformers
    (float64, 1e-10) given the very masks drawn (PEFT's nn.Dropout replaced by them); a column
    adapter's mask is the same on every TP rank; full recomputation replays the same masks."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import _hf, _ours

    c = dense.FAMILIES["llama"]
    folder = tmp_path / "model"
    if MPI.COMM_WORLD.rank == 0:
        dense.write_folder(folder, c, dense.arrays(c, seed=4))
    folder = MPI.COMM_WORLD.bcast(folder)
    MPI.COMM_WORLD.Barrier()
    idx, targets = np.random.default_rng(2).integers(0, c["vocab_size"], size=(2, B, T))
    adapters = None
    for tp, dp, pp, sp in _layouts(MPI.COMM_WORLD.size):
        with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
            grads = {}
            for recompute in ("none", "full"):
                model = GPT.from_pretrained(folder, grid, dtype="float64")
                apply_lora(model, LoraConfig(rank=R, alpha=ALPHA, dropout=P), seed=0)
                model.sequence_parallel, model.recompute = sp, recompute
                lora = {n: p for n, p in model.named_parameters() if ".lora." in n}
                if adapters is None:
                    rng = np.random.default_rng(9)
                    adapters = {n: rng.standard_normal(p.global_shape) * 0.3 for n, p in sorted(lora.items())}
                    adapters = MPI.COMM_WORLD.bcast(adapters)  # every stage's names, from a pp=1 layout
                for n, p in lora.items():
                    p.data[...] = p.slab_of(adapters[n])
                masks = _record_masks(monkeypatch, model)
                rows = slice(grid.dp_rank * (B // dp), (grid.dp_rank + 1) * (B // dp))
                loss = StepRunner(model, grid, 1, synchronous=True).forward_backward(idx[rows], targets[rows])
                monkeypatch.undo()
                average_gradients(model.parameters(), grid.dp_comm)
                loss = float(grid.dp_comm.allreduce(np.array([loss]))[0]) / dp
                grads[recompute] = {n: gather(p, grid.tp_comm) for n, p in lora.items()}
                if recompute == "none":
                    keep = _global_masks(masks, grid, sp)
            where = (tp, dp, pp, sp)
            for n in grads["none"]:
                assert np.array_equal(grads["full"][n], grads["none"][n]), (where, n)
            ref_loss, ref_grads = _peft_with_masks(torch, peft, _hf(folder, _ours(folder)), adapters, keep, idx,
                                                   targets, c["vocab_size"])
            assert abs(loss - ref_loss) < 1e-12 * ref_loss, where
            for n, g in grads["none"].items():
                assert max_rel(g, ref_grads[n]) < 1e-10, (where, n)


def _peft_with_masks(torch, peft, hf_model, adapters, keep, idx, targets, vocab):
    """PEFT's loss and adapter gradients with each adapter's dropout replaced by its mask (the
    model in eval mode, as in the checks above: the masks are the dropout, whatever the mode)."""

    class Fixed(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.mask = torch.as_tensor(mask / (1.0 - P))

        def forward(self, x):
            return x * self.mask

    model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=P)).to(torch.float64)
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    with torch.no_grad():
        for n, a in adapters.items():
            params[peft_name(n)].copy_(torch.as_tensor(a.T))
    assert sorted(keep) == sorted({n.removesuffix(".lora.a").removesuffix(".lora.b") for n in adapters})
    for name, mask in keep.items():
        owner = peft_name(f"{name}.lora.a").removesuffix(".lora_A.default.weight")
        modules[f"{owner}.lora_dropout"]["default"] = Fixed(mask.astype(np.float64))
    out = model(input_ids=torch.as_tensor(idx))
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, vocab), torch.as_tensor(targets).reshape(-1))
    loss.backward()
    return loss.item(), {n: params[peft_name(n)].grad.numpy().T.copy() for n in adapters}
