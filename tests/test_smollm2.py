"""A real model end to end: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads, tied, vocabulary
49152), fetched once per machine as llama.cpp's GGUF file (tests/_smollm2.py), served with
`mpisplit serve --gguf` at tp = 3 (its Q4_1 and Q8_0 blocks kept, the default) and tp = 1 (with
--dequantize) in float32 and asked through the official openai client, on /v1/completions (its chat
format written out) and /v1/chat/completions (its own template).

References: the model's own answer to "What is the capital of France?" (Paris, ending its turn
with <|im_end|>: finish_reason "stop", no special token in the text); the two layouts against each
other (kept blocks against dequantized floats: greedy ids equal, logprobs within 1e-3); streamed deltas against the whole answer; and where
transformers and torch are installed, transformers on the folder `mpisplit convert --from-gguf`
writes: greedy ids and log-softmax, and `apply_chat_template` + greedy `generate` for the chats
(absent, that comparison skips; the rest runs everywhere).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _serving import Server, serve_env
from _smollm2 import CHATS, smollm2_gguf
from conftest import REPO_ROOT
from mpi4py import MPI

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(900)]
openai = pytest.importorskip("openai")
pytest.importorskip("gguf", reason="the gguf package reads the model file")

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
N = 8
CHAT_TOKENS = 24


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)


def _complete(client) -> tuple[str, list[str], list[float]]:
    out = client.completions.create(model="smollm2", prompt=QUESTION, max_tokens=N, temperature=0, logprobs=1,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    return choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs


def _chats(client) -> dict:
    answers = [client.chat.completions.create(model="smollm2", messages=m, max_tokens=CHAT_TOKENS, temperature=0)
               for m in CHATS]
    stream = client.chat.completions.create(model="smollm2", messages=CHATS[0], max_tokens=CHAT_TOKENS,
                                            temperature=0, stream=True)
    chunks = list(stream)
    return {"answers": [(a.choices[0].message.content, a.choices[0].finish_reason) for a in answers],
            "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            "roles": [c.choices[0].delta.role for c in chunks if c.choices][:1]}


@pytest.fixture(scope="module")
def served():
    """What the servers answered: {tp: completion} and the tp = 3 server's chats."""
    path = str(smollm2_gguf())
    args = ["--gguf", path, "--max-model-len", "512", "--max-batch", "2", "--model-name", "smollm2"]
    got = {}
    with Server(3, args, env=serve_env()) as server:
        client = _client(server.url)
        got[3], got["chat"] = _complete(client), _chats(client)
    with Server(1, [*args, "--dequantize"], env=serve_env()) as server:
        got[1] = _complete(_client(server.url))
    return got


def test_completions_answer_paris_at_tp_3_and_1_and_agree(served):
    (text3, tokens3, lp3), (text1, tokens1, lp1) = served[3], served[1]
    assert "Paris" in text3, text3
    assert tokens3 == tokens1 and text3 == text1
    assert np.allclose(lp3, lp1, atol=1e-3), (lp3, lp1)


def test_chat_answers_end_their_turn_and_stream_the_same(served):
    chat = served["chat"]
    first, reason = chat["answers"][0]
    assert "Paris" in first and reason == "stop", chat
    for content, finish in chat["answers"]:
        assert "<|im_end|>" not in content and "<|im_start|>" not in content and finish in ("stop", "length")
    assert chat["streamed"] == first and chat["roles"] == ["assistant"]


@pytest.fixture(scope="module")
def transformers_model(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch is not installed: no transformers comparison")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    done = subprocess.run([sys.executable, "-m", "mpisplit", "convert", "--from-gguf", str(smollm2_gguf()), str(folder)],
                          cwd=REPO_ROOT, env=serve_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return torch, tok, transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_completion_ids_and_logprobs_equal_transformers(served, transformers_model):
    torch, tok, model = transformers_model
    ids = torch.tensor([tok(QUESTION, add_special_tokens=False)["input_ids"]])
    logprobs = []
    with torch.no_grad():  # greedy, one full forward per token
        for _ in range(N):
            lp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            nxt = int(lp.argmax())
            logprobs.append(float(lp[nxt]))
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    text, _, lp3 = served[3]
    assert text == tok.decode(ids[0, -N:]), (text, tok.decode(ids[0, -N:]))
    assert np.allclose(lp3, logprobs, atol=1e-3), (lp3, logprobs)


def test_chat_answers_equal_transformers_apply_chat_template_and_generate(served, transformers_model):
    torch, tok, model = transformers_model
    for messages, (content, _) in zip(CHATS, served["chat"]["answers"]):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=CHAT_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert content == expected, (messages, content, expected)
