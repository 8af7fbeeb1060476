"""Llama-family models against transformers and PyTorch (skipped where they are not installed).

    python -m pytest -q tests/test_llama_hf.py

The tiny folders of tests/_dense_llama.py are loaded by transformers (LlamaForCausalLM,
Qwen2ForCausalLM, MistralForCausalLM) in float64. transformers computes two things in float32
even in a float64 model: RMSNorm (it casts the input to float32) and the rotary cos/sin. For the
1e-12 comparisons its RMSNorm forward is replaced by the same formula in the input's dtype and
its rotary tables by float64 ones from its own inv_freq rule (checked separately against
mpisplit's frequencies to float32 precision); everything else is transformers' own code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _dense_llama as dense
import numpy as np
import pytest
from _mpi import max_rel
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from mpi4py import MPI

from mpisplit.models.gpt import GPT
from mpisplit.nn.rotary import inv_freq
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import SGD, AdamW

torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with PyTorch is skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")


@pytest.fixture(scope="module", params=list(dense.FAMILIES))
def family(request, tmp_path_factory):
    c = dense.FAMILIES[request.param]
    w = dense.arrays(c, seed=7)
    folder = tmp_path_factory.mktemp(request.param)
    dense.write_folder(folder, c, w)
    return request.param, folder, c, w


def _full_precision(model, ours_inv: np.ndarray) -> None:
    """transformers' RMSNorm without the float32 cast; rotary tables in float64."""
    def rms(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = rms.__get__(mod)
    rot = model.model.rotary_emb
    inv = rot.inv_freq.double()
    assert np.abs(inv.numpy() / ours_inv - 1).max() < 1e-6  # the same frequencies (float32 there)

    def rotary(x, position_ids):
        f = position_ids[..., None].double() * torch.tensor(ours_inv)
        emb = torch.cat([f, f], dim=-1)
        return emb.cos(), emb.sin()

    rot.forward = rotary


def _hf(folder: Path, ours: GPT):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    cfg = ours.config
    _full_precision(model, inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling))
    return model


def _ours(folder: Path) -> GPT:
    return GPT.from_pretrained(folder, ProcessGrid(tp=1, comm=MPI.COMM_SELF), dtype="float64")


def test_logits_and_greedy_ids_equal_transformers(family):
    name, folder, c, _ = family
    ours = _ours(folder)
    ref = _hf(folder, ours)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], size=(2, 11))
    with torch.no_grad():
        logits = ref(torch.tensor(ids)).logits.numpy()
    assert max_rel(ours(ids).data, logits) < 1e-12, name
    greedy = ids[:1]
    with torch.no_grad():  # greedy decoding by transformers' full forward, one token at a time
        for _ in range(8):
            nxt = ref(torch.tensor(greedy)).logits[0, -1].argmax().item()
            greedy = np.concatenate([greedy, [[nxt]]], axis=1)
    assert np.array_equal(ours.generate(ids[:1], 8), greedy), name


def _step_weights(folder: Path, c: dict, optimizer: str) -> tuple[dict, dict]:
    """One optimizer step from the same weights and batch in both; the updated global tensors
    under transformers' names."""
    ours = _ours(folder)
    ref = _hf(folder, ours)
    ids = np.random.default_rng(1).integers(0, c["vocab_size"], size=(2, 10))
    x, y = ids[:, :-1], ids[:, 1:]
    if optimizer == "sgd":
        opt, topt = SGD(ours.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    else:
        decay = [p for p in ref.parameters() if p.ndim >= 2]
        rest = [p for p in ref.parameters() if p.ndim < 2]
        opt = AdamW(ours.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
        topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    ours.loss(x, y).backward()
    opt.step()
    logits = ref(torch.tensor(x)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y).reshape(-1)).backward()
    topt.step()
    from mpisplit.models.hf_layout import hf_name

    mine = {}
    for n, p in ours.named_parameters():
        key, transposed = hf_name(n)
        mine[key] = p.data.T if transposed else p.data
    theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items() if k in mine}
    return mine, theirs


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_optimizer_step_equals_pytorch(family, optimizer):
    name, folder, c, _ = family
    mine, theirs = _step_weights(folder, c, optimizer)
    assert set(theirs) == set(mine)
    for k in mine:
        assert np.abs(mine[k] - theirs[k]).max() < 1e-10, (name, optimizer, k)


def test_convert_to_hf_loads_in_transformers_with_equal_logits(tmp_path):
    c = dense.FAMILIES["llama"]
    w = dense.arrays(c, seed=2)
    dense.write_folder(tmp_path / "src", c, w)
    env = clean_mpi_env()
    run = [mpiexec_path(), "-n", "2", sys.executable, "-m", "mpisplit", "convert"]
    for args in (["--from-hf", str(tmp_path / "src"), str(tmp_path / "ckpt")],
                 ["--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]):
        done = subprocess.run(run + args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float64)
    ids = torch.tensor(np.random.default_rng(2).integers(0, c["vocab_size"], size=(1, 9)))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)
