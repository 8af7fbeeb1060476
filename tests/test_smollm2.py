"""A real model end to end: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads, tied, vocabulary
49152), fetched once per machine as llama.cpp's GGUF file (tests/_smollm2.py), served with
`mpisplit serve --gguf` at tp = 3 and tp = 1 in float32 and asked through the official openai client.

References: the model's own answer to "What is the capital of France?" in its chat format
(Paris); the two layouts against each other (greedy ids equal, logprobs within 1e-3); where
transformers and torch are installed, transformers' greedy ids and log-softmax on the folder that
`mpisplit convert --from-gguf` writes (with them absent that comparison skips; the rest runs).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _serving import Server, serve_env
from _smollm2 import smollm2_gguf
from conftest import REPO_ROOT
from mpi4py import MPI

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(900)]
openai = pytest.importorskip("openai")
pytest.importorskip("gguf", reason="the gguf package reads the model file")

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
N = 8


def ask(url: str) -> tuple[str, list[str], list[float]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300)
    out = client.completions.create(model="smollm2", prompt=QUESTION, max_tokens=N, temperature=0, logprobs=1)
    choice = out.choices[0]
    return choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs


@pytest.fixture(scope="module")
def answers():
    path = str(smollm2_gguf())
    got = {}
    for tp in (3, 1):
        with Server(tp, ["--gguf", path, "--max-model-len", "256", "--max-batch", "2", "--model-name", "smollm2"],
                    env=serve_env()) as server:
            got[tp] = ask(server.url)
    return got


def test_served_model_answers_paris_at_tp_3_and_1(answers):
    for tp, (text, _, _) in answers.items():
        assert "Paris" in text, (tp, text)


def test_layouts_agree_on_ids_and_logprobs(answers):
    (text3, tokens3, lp3), (text1, tokens1, lp1) = answers[3], answers[1]
    assert tokens3 == tokens1 and text3 == text1
    assert np.allclose(lp3, lp1, atol=1e-3), (lp3, lp1)


def test_served_ids_and_logprobs_equal_transformers(answers, tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch is not installed: no transformers comparison")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    done = subprocess.run([sys.executable, "-m", "mpisplit", "convert", "--from-gguf", str(smollm2_gguf()), str(folder)],
                          cwd=REPO_ROOT, env=serve_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([tok(QUESTION, add_special_tokens=False)["input_ids"]])
    logprobs = []
    with torch.no_grad():  # greedy, one full forward per token
        for _ in range(N):
            lp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            nxt = int(lp.argmax())
            logprobs.append(float(lp[nxt]))
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    text, _, served = answers[3]
    assert text == tok.decode(ids[0, -N:]), (text, tok.decode(ids[0, -N:]))
    assert np.allclose(served, logprobs, atol=1e-3), (served, logprobs)
