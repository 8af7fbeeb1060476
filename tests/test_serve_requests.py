"""Every request field of /v1/completions against a real server at 1 and 2 ranks (the official
openai client and httpx): values at the edge of validation, end of sequence, the sampling
fields, n, echo, the API key from the environment. References: a float64 one-rank forward pass
over the whole context per token in this process, with the penalty formulas written out here
token by token (OpenAI's presence/frequency, transformers' repetition), and the same requests
sent alone."""

from __future__ import annotations

import concurrent.futures
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serving import CHARS, Server, greedy_reference, serve_env, tiny_model, write_char_checkpoint
from mpi4py import MPI

import mpisplit as ms
from mpisplit.serving.loading import load_model_and_tokenizer
from mpisplit.serving.sampling import log_softmax

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
openai = pytest.importorskip("openai")

KEY = "test-key-0123456789abcdef"
PROMPT = "the cat"


@pytest.fixture(scope="module")
def eos_case(tmp_path_factory):
    """A checkpoint whose meta names as eos the token that greedy decoding of PROMPT draws at
    position k (its first occurrence); the in-process model; the ignore-eos greedy tokens."""
    ids = [CHARS.index(c) for c in PROMPT]
    model = tiny_model(len(CHARS), 11)
    ref = greedy_reference(model, ids, 40).tolist()
    model.grid.free()
    k = next(i for i in range(3, 40) if ref[i] not in ref[:i])
    root = write_char_checkpoint(tmp_path_factory.mktemp("req") / "char", eos_token_ids=[ref[k]])
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    loaded, _, eos = load_model_and_tokenizer(grid, ckpt=str(root), dtype="float64")
    assert eos == (ref[k],)
    yield {"root": root, "ids": ids, "ref": ref, "k": k, "eos": ref[k], "model": loaded}
    grid.free()


@pytest.fixture(scope="module", params=[1, 2], ids=["n1", "n2"])
def server(request, eos_case):
    env = {**serve_env(), "MPISPLIT_API_KEY": KEY}
    with Server(request.param, ["--ckpt", str(eos_case["root"]), "--dtype", "float64", "--prefill-chunk", "4",
                                      "--batch-invariant", "--max-num-batched-tokens", "20"],
                env=env) as srv:
        srv.ranks = request.param
        yield srv


def complete(url: str, prompt=PROMPT, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    extra = {k: kw.pop(k) for k in list(kw) if k in ("top_k", "min_p", "repetition_penalty", "ignore_eos",
                                                      "stop_token_ids", "min_tokens")}
    return c.completions.create(model="char", prompt=prompt, extra_body=extra or None, **kw)


def post(url: str, body: dict | bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        return httpx.post(url + "/v1/completions", json={"model": "char", **body}, headers=headers, timeout=30)
    return httpx.post(url + "/v1/completions", content=body, headers=headers, timeout=30)


def text_of(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids)


def reference(model, prompt: list[int], n: int, *, bias: dict[int, float] | None = None, presence: float = 0.0,
              frequency: float = 0.0, repetition: float = 1.0, stops: tuple[int, ...] = (),
              min_tokens: int = 0) -> list[int]:
    """Greedy decoding, the whole context re-run per token (no cache), each rule token by token."""
    ids, out = list(prompt), []
    for _ in range(n):
        z = np.array(model(np.array([ids])).data[0, -1], dtype=np.float64)
        for t, b in (bias or {}).items():
            z[t] += b
        for t in set(ids):
            if repetition != 1.0:
                z[t] = z[t] / repetition if z[t] > 0 else z[t] * repetition
        for t in set(out):
            z[t] -= out.count(t) * frequency + presence
        if len(out) < min_tokens:
            for t in stops:
                z[t] = -math.inf
        tok = int(np.argmax(z))
        out.append(tok)
        ids.append(tok)
        if tok in stops and len(out) >= min_tokens:
            break
    return out


def test_tiny_temperature_and_top_p_are_greedy(server, eos_case):
    """Values validation accepts, down to the smallest subnormal: greedy (temperature < 1e-5),
    never NaN; with top_k, logprobs and streaming too. The server serves on."""
    greedy = complete(server.url, ignore_eos=True)
    assert greedy.choices[0].text == text_of(eos_case["ref"][:12])
    for kw in ({"temperature": 1e-310}, {"temperature": 5e-324}, {"temperature": 9.9e-6, "top_k": 3},
               {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 1e-310, "top_p": 5e-324, "logprobs": 2}):
        got = complete(server.url, ignore_eos=True, **kw)
        assert got.choices[0].text == greedy.choices[0].text, kw
        assert got.choices[0].finish_reason == "length"
    chunks = list(complete(server.url, ignore_eos=True, temperature=1e-310, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == greedy.choices[0].text
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("field", ["max_tokens", "seed", "logprobs", "n", "top_k", "temperature"])
def test_huge_integers_are_a_400_naming_the_field(server, field):
    raw = b'{"model": "char", "prompt": "a", "%s": %s}' % (field.encode(), b"9" * 5000)
    r = post(server.url, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "5000 digits" in r.json()["error"]["message"]
    r = post(server.url, b'{"model": "char", "prompt": "a", "temperature": 1e400}')  # inf once parsed
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text


def test_generation_ends_at_eos(server, eos_case):
    """The checkpoint's eos id: finish_reason "stop", its text left out, its id counted in usage
    (as vLLM counts it); the same streamed; ignore_eos runs on; stop_token_ids; min_tokens bans
    the stop ids until then (the reference bans them the same way)."""
    ref, k, eos = eos_case["ref"], eos_case["k"], eos_case["eos"]
    got = complete(server.url, max_tokens=30)
    c = got.choices[0]
    assert c.finish_reason == "stop" and c.text == text_of(ref[:k])
    assert got.usage.completion_tokens == k + 1
    chunks = list(complete(server.url, max_tokens=30, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    past = complete(server.url, max_tokens=30, ignore_eos=True)
    assert past.choices[0].finish_reason == "length" and past.choices[0].text == text_of(ref[:30])
    j = next(i for i in range(1, 30) if ref[i] not in ref[:i] and ref[i] != eos)
    other = complete(server.url, max_tokens=30, ignore_eos=True, stop_token_ids=[ref[j]])
    assert other.choices[0].finish_reason == "stop" and other.choices[0].text == text_of(ref[:j])
    want = reference(eos_case["model"], eos_case["ids"], 30, stops=(eos,), min_tokens=k + 3)
    late = complete(server.url, max_tokens=30, min_tokens=k + 3)
    assert late.choices[0].text == text_of(want[:-1] if want[-1] == eos else want)
    assert late.usage.completion_tokens == len(want) >= k + 3


PENALTIES = [
    {"logit_bias": {"7": 100}},
    {"logit_bias": {"3": -100, "12": 2.5, "20": 4}},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 0.7, "presence_penalty": -0.3},
    {"repetition_penalty": 1.7},
    {"repetition_penalty": 0.6, "frequency_penalty": 2, "logit_bias": {"5": 1}},
]


@pytest.mark.parametrize("fields", PENALTIES, ids=[",".join(f) for f in PENALTIES])
def test_bias_and_penalties_equal_the_formulas(server, eos_case, fields):
    bias = {int(t): b for t, b in fields.get("logit_bias", {}).items()}
    want = reference(eos_case["model"], eos_case["ids"], 20, bias=bias, presence=fields.get("presence_penalty", 0),
                     frequency=fields.get("frequency_penalty", 0), repetition=fields.get("repetition_penalty", 1))
    got = complete(server.url, max_tokens=20, ignore_eos=True, **fields)
    assert got.choices[0].text == text_of(want)
    if fields == PENALTIES[0]:
        assert got.choices[0].text == CHARS[7] * 20


def test_n_seeds_echo_min_p_top_k(server):
    """n choices, index 0..n-1, choice i drawing as a request with seed + i; echo; min_p = 1 and
    top_k = 1 leave only the most likely token (greedy)."""
    kw = {"temperature": 1.3, "max_tokens": 15, "ignore_eos": True}
    three = complete(server.url, n=3, seed=41, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [complete(server.url, seed=41 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in three.choices] == singles and len(set(singles)) > 1
    assert three.usage.completion_tokens == 45 and three.usage.prompt_tokens == len(PROMPT)
    assert [c.text for c in complete(server.url, n=3, seed=41, **kw).choices] == singles
    streamed = {i: "" for i in range(3)}
    for ch in complete(server.url, n=3, seed=41, stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] += c.text
    assert list(streamed.values()) == singles
    greedy = complete(server.url, max_tokens=15, ignore_eos=True).choices[0].text
    assert complete(server.url, min_p=1.0, seed=3, **kw).choices[0].text == greedy
    assert complete(server.url, top_k=1, seed=3, **kw).choices[0].text == greedy
    echoed = complete(server.url, echo=True, max_tokens=15, ignore_eos=True).choices[0].text
    assert echoed == PROMPT + greedy


def test_batch_invariance_with_every_field(server):
    """Requests with every field, sent together and alone: the same tokens; logprobs to the
    last bit (a sum over 2 ranks is exact in either order)."""
    jobs = [
        {"temperature": 0.9, "seed": 1, "top_k": 5, "min_p": 0.05, "presence_penalty": 0.5, "logprobs": 3},
        {"temperature": 1.1, "seed": 2, "top_p": 0.8, "frequency_penalty": 0.4, "repetition_penalty": 1.2,
         "logprobs": 2, "n": 2},
        {"logit_bias": {"4": 3}, "min_tokens": 5, "logprobs": 1, "stop_token_ids": [6, 9]},
        {"temperature": 0.7, "seed": 3, "echo": True, "stop": ["e"]},
    ]

    def record(job):
        resp = complete(server.url, max_tokens=14, **job)
        return [(c.text, c.finish_reason, None if c.logprobs is None else c.logprobs.token_logprobs)
                for c in resp.choices]

    alone = [record(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = [f.result() for f in [pool.submit(record, j) for j in jobs]]
    assert together == alone


def test_logprobs_are_the_models_own(server, eos_case):
    """With a logit_bias the token follows the bias, its logprob stays the model's log-softmax."""
    got = complete(server.url, max_tokens=3, ignore_eos=True, logit_bias={"7": 100}, logprobs=1).choices[0]
    ids = eos_case["ids"] + [7, 7]
    logits = eos_case["model"](np.array([ids])).data[0]
    for i in range(3):
        ref = log_softmax(np.asarray(logits[len(eos_case["ids"]) - 1 + i], dtype=np.float64))
        assert abs(got.logprobs.token_logprobs[i] - ref[7]) < 1e-10


@pytest.mark.parametrize("body,param", [
    ({"suffix": "!"}, "suffix"), ({"use_beam_search": True}, "use_beam_search"),
    ({"best_of": 2}, "best_of"),
    ({"logit_bias": {"7": 101}}, "logit_bias"), ({"logit_bias": {"999": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": 99}, "min_tokens"), ({"stop_token_ids": [99]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"echo": 1}, "echo")
])
def test_fields_refused_with_a_400_naming_them(server, body, param):
    r = post(server.url, {"prompt": "a", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_field_is_ignored_and_key_comes_from_the_environment(server):
    """As vLLM: a field nobody knows is ignored (and logged). MPISPLIT_API_KEY guards /v1 and is
    in no process's command line."""
    r = post(server.url, {"prompt": "a", "max_tokens": 2, "no_such_field": 1})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) <= 2
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert KEY.encode() not in cmdline.read_bytes()
        except OSError:
            continue
