"""Served LoRA adapters: `mpisplit serve --lora NAME=FOLDER` beside the base model, picked by a
request's "model", requests for different adapters in one batch, through the openai client.

Reference: transformers + PEFT in full float64 (`PeftModel.from_pretrained` on each adapter
folder, tests/test_llama_hf.py's exact rotary and RMSNorm), greedy decoding by argmax, the
log-softmax of each chosen token; the server in float64 at 1 and 2 ranks gives the same tokens
and their logprobs to 1e-9. The same three requests alone and sent together (one batch, the same
prompt: the prefix cache is the adapter's own) give the same bits (--batch-invariant).
"""

from __future__ import annotations

import concurrent.futures

import _dense_llama as dense
import numpy as np
import pytest
from _serving import Server
from mpi4py import MPI

from mpisplit.models.gpt import GPT
from mpisplit.models.lora import apply_lora
from mpisplit.models.peft_adapter import write_adapter
from mpisplit.nn.lora import LoraConfig
from mpisplit.parallel.grid import ProcessGrid

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
openai = pytest.importorskip("openai")
PROMPT, N = [5, 17, 3, 88, 42, 9, 61, 30, 2, 77, 14, 50, 23, 8, 91, 36, 4, 70], 8
ADAPTERS = {"one": (LoraConfig(rank=4, alpha=8.0), 1), "two": (LoraConfig(rank=2, alpha=4.0,
                                                                           targets=("q_proj", "v_proj", "down_proj")), 2)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-lora")
    c = dense.FAMILIES["llama"]
    dense.write_folder(path / "llama", c, dense.arrays(c, seed=4))
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        for name, (config, seed) in ADAPTERS.items():
            model = GPT.from_pretrained(path / "llama", g, dtype="float64")
            rng = np.random.default_rng(seed)
            params = apply_lora(model, config, seed=0)
            names = [n for n, _ in model.named_parameters() if ".lora." in n]
            arrays = {n: rng.standard_normal(p.global_shape) * 0.3 for n, p in zip(names, params)}
            write_adapter(path / name, arrays, config, str(path / "llama"))
    return path


@pytest.fixture(scope="module")
def reference(work):
    """Greedy ids and their logprobs per served name, from transformers + PEFT."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import _hf, _ours

    out = {}
    for name in ("llama", *ADAPTERS):
        model = _hf(work / "llama", _ours(work / "llama"))
        if name != "llama":
            model = peft.PeftModel.from_pretrained(model, work / name).to(torch.float64)
        ids, logprobs = list(PROMPT), []
        with torch.no_grad():
            for _ in range(N):
                logp = torch.log_softmax(model(input_ids=torch.as_tensor([ids])).logits[0, -1], dim=-1)
                ids.append(int(logp.argmax()))
                logprobs.append(float(logp[ids[-1]]))
        out[name] = (ids[len(PROMPT):], logprobs)
    assert len({tuple(v[0]) for v in out.values()}) == 3  # the adapters change the answer
    return out


def _ask(client, name):
    r = client.completions.create(model=name, prompt=[PROMPT], max_tokens=N, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    return r.model, [int(t) for t in lp.tokens], lp.token_logprobs


@pytest.mark.parametrize("n", [1, 2])
def test_each_adapter_answers_as_peft_alone_and_batched(work, reference, n):
    flags = ["--hf", str(work / "llama"), "--dtype", "float64", "--batch-invariant", "--model-name", "llama",
             "--lora", f"one={work / 'one'}", "--lora", f"two={work / 'two'}"]
    with Server(n, flags) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["llama", "one", "two"]
        assert [getattr(m, "parent", None) for m in listed] == [None, "llama", "llama"]
        alone = {name: _ask(client, name) for name in ("llama", "one", "two")}
        for name, (model, ids, logprobs) in alone.items():
            want_ids, want_lp = reference[name]
            assert model == name and ids == want_ids, (name, ids, want_ids)
            assert np.allclose(logprobs, want_lp, rtol=0, atol=1e-9), (name, logprobs, want_lp)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # together, twice over: shared batches
            together = list(pool.map(lambda name: (name, _ask(client, name)), ["one", "two", "llama"] * 2))
        for name, answer in together:
            assert answer == alone[name], name  # the same bits beside the other adapters
        with pytest.raises(openai.BadRequestError, match="model 'three' is not served here"):
            client.completions.create(model="three", prompt=[PROMPT], max_tokens=2)
        assert server.stop() == 0


def test_bad_lora_flag_is_one_clear_error(work):
    import subprocess
    import sys

    from _serving import serve_env
    from conftest import mpiexec_command

    for value, message in (("one", "--lora takes NAME=FOLDER, got 'one'"),
                           (f"x={work / 'nope'}", "the adapter folder does not exist"),
                           (f"x={work / 'llama'}", "is not a PEFT adapter folder")):
        done = subprocess.run([*mpiexec_command(2), sys.executable, "-m", "mpisplit.serve", "--hf", str(work / "llama"),
                               "--port", "0", "--lora", value], capture_output=True, text=True, env=serve_env(),
                              timeout=120, check=False)
        assert done.returncode == 2 and message in done.stderr, (value, done.stderr[-2000:])
