"""Prompt logprobs (echo with logprobs, vLLM's prompt_logprobs) and several prompts in one
request, on real servers at 1 and 2 ranks, as lm-eval's local-completions asks for them.

References: a float64 one-rank forward pass of the same model over each whole prompt in this
process (log-softmax of row i - 1 at prompt token i, and the ranks and top alternatives by a
full sort), and the same prompts sent one request each.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from _serving import CHARS, Server, tiny_model, write_char_checkpoint
from mpi4py import MPI

from mpisplit.serving.sampling import log_softmax

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(300)]

PROMPTS = ["the cat sat on the mat", "a quick brown fox", "the cat sat on the hat and then"]


@pytest.fixture(scope="module")
def model():
    m = tiny_model(len(CHARS), 11)
    yield m
    m.grid.free()


@pytest.fixture(scope="module", params=[1, 2])
def server(request, tmp_path_factory):
    ckpt = write_char_checkpoint(tmp_path_factory.mktemp("plp") / "char")
    # A 4-position block and 8-token chunks: prompts cross blocks and chunks, and share prefixes.
    with Server(request.param, ["--ckpt", str(ckpt), "--dtype", "float64", "--kv-block-size", "4",
                                "--prefill-chunk", "8", "--batch-invariant"]) as srv:
        yield srv


def ids(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def reference(model, prompt: list[int]) -> np.ndarray:
    """(len(prompt) - 1, vocab) float64 log-probabilities of prompt tokens 1, 2, ... ."""
    logits = np.asarray(model(np.array([prompt])).data[0], dtype=np.float64)
    return np.stack([log_softmax(row) for row in logits[:-1]])


def post(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "char", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_logprobs_gives_every_prompt_tokens_logprob(server, model) -> None:
    """lm-eval's request: id lists, max_tokens 1, echo, logprobs 1; several prompts at once."""
    prompts = [ids(p) for p in PROMPTS]
    body = post(server.url, {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    for choice, text, prompt in zip(body["choices"], PROMPTS, prompts):
        lp = choice["logprobs"]
        ref = reference(model, prompt)
        assert choice["text"].startswith(text) and len(lp["tokens"]) == len(prompt) + 1
        assert lp["tokens"][: len(prompt)] == list(text)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = np.array(lp["token_logprobs"][1: len(prompt)])
        want = np.array([ref[i - 1, t] for i, t in enumerate(prompt) if i > 0])
        assert np.abs(got - want).max() < 1e-10
        for i in range(1, len(prompt)):  # the top alternative is the model's argmax
            (token, value), = lp["top_logprobs"][i].items()
            assert token == CHARS[int(np.argmax(ref[i - 1]))] and abs(value - ref[i - 1].max()) < 1e-10
        assert lp["text_offset"][: len(prompt)] == list(range(len(prompt)))
        assert lp["text_offset"][len(prompt)] == len(text)  # the generated token comes after the echo


def test_prompt_logprobs_are_the_same_alone_together_and_with_a_cached_prefix(server) -> None:
    prompts = [ids(p) for p in PROMPTS]
    alone = [post(server.url, {"prompt": p, "max_tokens": 2, "echo": True, "logprobs": 3})["choices"][0]
             for p in prompts]
    again = post(server.url, {"prompt": prompts, "max_tokens": 2, "echo": True, "logprobs": 3})["choices"]
    for a, b in zip(alone, again):  # the second time, the shared blocks are in the prefix cache
        assert a["logprobs"] == b["logprobs"] and a["text"] == b["text"]


def test_vllm_prompt_logprobs_with_ranks(server, model) -> None:
    prompt = ids(PROMPTS[0])
    choice = post(server.url, {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2})["choices"][0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    ref = reference(model, prompt)
    for i in range(1, len(prompt)):
        row, token = ref[i - 1], prompt[i]
        order = np.argsort(-row, kind="stable")
        entry = entries[i]
        assert abs(entry[str(token)]["logprob"] - row[token]) < 1e-10
        assert entry[str(token)]["rank"] == int(np.count_nonzero(row > row[token])) + 1
        assert entry[str(token)]["decoded_token"] == CHARS[token]
        for r, alt in enumerate(order[:2], start=1):
            assert entry[str(alt)]["logprob"] == pytest.approx(row[alt], abs=1e-10)
            if alt != token:
                assert entry[str(alt)]["rank"] == r
    assert choice["logprobs"] is None and not choice["text"].startswith(PROMPTS[0])


def test_several_prompts_times_n_in_order(server) -> None:
    texts = ["the cat", "a dog"]
    body = post(server.url, {"prompt": texts, "max_tokens": 4, "n": 2, "seed": 5, "temperature": 1.0})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for k, text in enumerate(texts):
        for i in range(2):
            one = post(server.url, {"prompt": text, "max_tokens": 4, "n": 2, "seed": 5, "temperature": 1.0})
            assert body["choices"][2 * k + i]["text"] == one["choices"][i]["text"]


def test_streamed_echo_with_logprobs_equals_the_whole_answer(server) -> None:
    prompt = ids(PROMPTS[1])
    whole = post(server.url, {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1})["choices"][0]
    text, tokens, values = "", [], []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "char", "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1,
            "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            import json

            for c in json.loads(line[6:])["choices"]:
                text += c["text"]
                if c["logprobs"]:
                    tokens += c["logprobs"]["tokens"]
                    values += c["logprobs"]["token_logprobs"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"] and values == whole["logprobs"]["token_logprobs"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": [[1, 2], "ab", 5]}, "prompt"),
    ({"prompt": [[1, 2]] * 65}, "prompt"),
    ({"prompt": [[1, 2]] * 8, "n": 9}, "n"),
    ({"prompt": "ab", "prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_prompt_lists_are_a_400(server, body, param) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "char", **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
