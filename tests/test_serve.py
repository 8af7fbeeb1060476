"""`mpiexec -n N python -m mpisplit.serve` as a real server at 1 and 2 ranks, through the
official openai client and httpx. References: the `mpisplit generate` command, the same
requests sent one at a time, and the log-softmax of an in-process float64 forward pass."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from _serving import CHARS, Server, serve_env, write_char_checkpoint
from mpi4py import MPI

from mpisplit.serving.sampling import log_softmax

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
openai = pytest.importorskip("openai")

PROMPTS = ["the cat", "a", "why is the sky so blue?\n", "hello, world! ", "quite a long prompt, isn't it, friend"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_char_checkpoint(tmp_path_factory.mktemp("serve") / "char")


@pytest.fixture(scope="module", params=[1, 2], ids=["n1", "n2"])
def server(request, ckpt):
    with Server(request.param, ["--ckpt", str(ckpt), "--dtype", "float64", "--prefill-chunk", "8",
                                "--batch-invariant"]) as srv:
        srv.ranks = request.param
        yield srv


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


def complete(url: str, prompt, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client(url).completions.create(model="char", prompt=prompt, **kw)


def as_record(resp) -> tuple:
    c = resp.choices[0]
    lp = None if c.logprobs is None else (tuple(c.logprobs.token_logprobs), tuple(map(str, c.logprobs.top_logprobs)))
    return c.text, c.finish_reason, lp


def generate_command(ckpt, prompt: str, n: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mpisplit.generate", "--ckpt", str(ckpt), "--prompt", prompt,
         "--max-new-tokens", str(n), "--dtype", "float64"],
        capture_output=True, text=True, timeout=60, env=serve_env(), check=True,
    ).stdout
    assert out.startswith(prompt)
    return out[len(prompt):].removesuffix("\n")


def test_greedy_equals_generate_command(server, ckpt):
    for prompt in (PROMPTS[0], PROMPTS[3]):  # the second is longer than one prefill chunk
        expected = generate_command(ckpt, prompt, 20)
        resp = complete(server.url, prompt, max_tokens=20)
        assert resp.choices[0].text == expected
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 20
        assert resp.usage.total_tokens == len(prompt) + 20
        assert resp.model == "char" and resp.object == "text_completion" and resp.id


def test_token_id_prompt_equals_text_prompt(server):
    ids = [CHARS.index(c) for c in PROMPTS[0]]
    assert complete(server.url, ids).choices[0].text == complete(server.url, PROMPTS[0]).choices[0].text


def test_logprobs_equal_in_process_log_softmax(server, ckpt):
    """logprobs=3: the chosen token's and the top 3 against log_softmax of a float64 forward
    pass over prompt + completion in this process (no cache, no batching)."""
    from mpisplit.serving.loading import load_model_and_tokenizer

    resp = complete(server.url, PROMPTS[2], max_tokens=8, logprobs=3)
    lp = resp.choices[0].logprobs
    import mpisplit as ms

    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    model, tok, _ = load_model_and_tokenizer(grid, ckpt=str(ckpt), dtype="float64")
    ids = tok.encode(PROMPTS[2] + resp.choices[0].text)
    logits = model(ids[None]).data[0]
    P = len(PROMPTS[2])
    for i in range(8):
        ref = log_softmax(logits[P - 1 + i])
        token = int(ids[P + i])
        assert lp.tokens[i] == CHARS[token]
        assert abs(lp.token_logprobs[i] - ref[token]) < 1e-10
        top = sorted(range(len(CHARS)), key=lambda t: -ref[t])[:3]
        assert list(lp.top_logprobs[i]) == [CHARS[t] for t in top]
        assert np.allclose(list(lp.top_logprobs[i].values()), ref[top], atol=1e-10, rtol=0)
        assert lp.text_offset[i] == i
        assert lp.token_logprobs[i] == lp.top_logprobs[i][lp.tokens[i]]  # greedy: the top token
    grid.free()


def test_stream_equals_non_stream(server):
    for kw in ({"logprobs": 2}, {"temperature": 0.8, "seed": 5, "top_k": None}, {"stop": ["e"]}):
        whole = complete(server.url, PROMPTS[0], max_tokens=15, **{k: v for k, v in kw.items() if v is not None})
        chunks = list(complete(server.url, PROMPTS[0], max_tokens=15, stream=True,
                               stream_options={"include_usage": True},
                               **{k: v for k, v in kw.items() if v is not None}))
        usage = chunks[-1].usage
        parts = [c.choices[0] for c in chunks if c.choices]
        assert "".join(p.text for p in parts) == whole.choices[0].text
        assert parts[-1].finish_reason == whole.choices[0].finish_reason
        assert all(p.finish_reason is None for p in parts[:-1])
        assert usage.completion_tokens == whole.usage.completion_tokens
        if "logprobs" in kw:
            streamed = [x for p in parts for x in p.logprobs.token_logprobs]
            assert streamed == whole.choices[0].logprobs.token_logprobs


def test_sse_wire_format(server):
    body = {"model": "char", "prompt": "a", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) == 4


def test_concurrent_equals_one_by_one_bitwise(server):
    """Greedy and seeded sampled requests of different prompt lengths, all at once (they
    share steps) and one at a time: the same text and the same float64 logprobs, bit for bit."""
    jobs = [{"prompt": p, "max_tokens": 6 + 3 * i, "logprobs": 1} for i, p in enumerate(PROMPTS)]
    jobs += [{"prompt": p, "max_tokens": 10, "temperature": 1.0, "seed": 100 + i, "logprobs": 1, "top_p": 0.9}
             for i, p in enumerate(PROMPTS[:3])]
    alone = [as_record(complete(server.url, **job)) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = [as_record(f.result()) for f in [pool.submit(complete, server.url, **job) for job in jobs]]
    assert together == alone
    again = [as_record(complete(server.url, **job)) for job in jobs[-3:]]
    assert again == alone[-3:]  # seeded sampling is reproducible
    other_seed = as_record(complete(server.url, **{**jobs[-1], "seed": 999}))
    assert other_seed[0] != alone[-1][0]


def test_stop_strings_non_stream_and_held_back_in_stream(server):
    full = complete(server.url, PROMPTS[1], max_tokens=30).choices[0].text
    stop = full[10:13]  # three characters from the middle of the greedy text
    cut = full[: full.index(stop)]
    resp = complete(server.url, PROMPTS[1], max_tokens=30, stop=[stop, "\u00e9never"])
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in complete(server.url, PROMPTS[1], max_tokens=30, stop=stop, stream=True)]
    assert "".join(pieces) == cut
    shown = ""
    for piece in pieces:  # nothing shown ever extends past the cut
        shown += piece
        assert cut.startswith(shown)


BAD = [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "a", "max_tokens": 64}, "max_tokens", "context is 64"),
    ({"prompt": "a", "temperature": -0.5}, "temperature", ">= 0"),
    ({"prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"prompt": "aZb"}, "prompt", "'Z'"),
    ({"prompt": [1, 2, 999]}, "prompt", "999"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": 5}, "prompt", "string or a list"),
    ({"prompt": "a", "model": "gpt-9"}, "model", "gpt-9"),
    ({"prompt": "a", "n": 17}, "n", "<= 16"),
    ({"prompt": "a", "n": 2, "best_of": 3}, "best_of", "must equal 'n'"),
    ({"prompt": "a", "logprobs": 50}, "logprobs", "<= 20"),
    ({"prompt": "a", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "a", "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
]


@pytest.mark.parametrize("body,param,needle", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(server, body, param, needle):
    r = httpx.post(server.url + "/v1/completions", json={"model": "char", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error"


def test_malformed_bodies_and_server_goes_on(server):
    post = lambda content: httpx.post(server.url + "/v1/completions", content=content, timeout=30)
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    surrogate = b'{"model": "char", "prompt": "a\\ud800"}'  # a lone surrogate, JSON-escaped
    for content, needle in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                            (b"x" * (1 << 20 + 1), "limit"), (deep, "nested too deeply"),
                            (surrogate, "lone surrogate")):
        r = post(content)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    chat_body = b'{"model": "char", "messages": [{"role": "user", "content": "a\\udc00"}]}'
    chat = httpx.post(server.url + "/v1/chat/completions", content=chat_body, timeout=30)
    assert chat.status_code == 400 and "'messages' holds a lone surrogate" in chat.json()["error"]["message"], chat.text
    with pytest.raises(openai.BadRequestError):
        complete(server.url, "a", suffix="!")
    assert complete(server.url, "a", max_tokens=2).choices[0].finish_reason == "length"


def test_models_health_metrics(server):
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == ["char"]
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    complete(server.url, "a", max_tokens=3)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['mpisplit_requests_total{outcome="length"}'] >= 1
    assert values["mpisplit_generated_tokens_total"] >= 3 and values["mpisplit_prompt_tokens_total"] >= 1
    assert values["mpisplit_queue_length"] == 0
    assert values["mpisplit_time_to_first_token_seconds_count"] >= 1
    assert values["mpisplit_inter_token_latency_seconds_count"] >= 2
    assert "mpisplit_batch_occupancy_bucket" in text


def cpu_seconds_of_server(root: int) -> dict[int, float]:
    """utime + stime of the python processes under mpiexec `root` (its ranks and rank 0's
    HTTP front-end process)."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, argv0)
    under, out = {root}, {}
    for _ in range(5):  # mpiexec -> proxy -> rank -> front end
        under |= {pid for pid, (ppid, _, _) in procs.items() if ppid in under}
    for pid in under - {root}:
        if os.path.basename(procs[pid][2]).startswith(b"python"):
            out[pid] = procs[pid][1]
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_idle_server_does_not_spin(server):
    """Every rank of an idle server, and its front end, uses under 10 % of a core (a spinning
    wait would use 100 %)."""
    time.sleep(1.0)
    before = cpu_seconds_of_server(server.proc.pid)
    time.sleep(3.0)
    after = cpu_seconds_of_server(server.proc.pid)
    assert len(before) == server.ranks + 1
    for pid, t in before.items():
        assert (after[pid] - t) / 3.0 < 0.10, (pid, after[pid] - t)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_queue_full_disconnect_api_key_and_sigterm(ckpt):
    """One slot and a queue of one: a third request gets 429; a dropped stream frees the slot;
    --api-key guards /v1; SIGTERM lets the request in flight finish, then the job exits 0."""
    key = "s3cret"
    # Every engine step sleeps 50 ms, so the first stream still holds its slot when it is closed.
    env = {**serve_env(), "MPISPLIT_FAULT": "sleep@seconds=0.05"}
    with Server(2, ["--ckpt", str(ckpt), "--dtype", "float64", "--max-batch", "1", "--max-queue", "1",
                    "--api-key", key], env=env) as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv.url, api_key="wrong").completions.create(model="char", prompt="a", max_tokens=2)
        c = client(srv.url, api_key=key)
        slow = {"model": "char", "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
        first = c.completions.create(**slow)
        next(iter(first))  # it holds the slot
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(lambda: c.completions.create(**{**slow, "stream": False, "max_tokens": 3}))
            deadline = time.monotonic() + 30
            while metric(srv.url, "mpisplit_queue_length") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(**{**slow, "stream": False})
            first.close()  # the client goes away: its slot goes to the queued request
            assert queued.result(timeout=60).choices[0].finish_reason == "length"
        assert metric(srv.url, 'mpisplit_requests_total{outcome="cancelled"}') == 1
        long = c.completions.create(**{**slow, "max_tokens": 60})
        chunks = iter(long)
        next(chunks)
        start = time.monotonic()
        srv.proc.send_signal(15)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length" and len(rest) == 59
        assert srv.proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 20
        assert "server stopped" in "".join(srv.log)


@pytest.mark.parametrize("rank", [0, 1])
def test_engine_failure_fails_requests_and_ends_the_job(ckpt, rank):
    """An exception inside an engine step (injected at step 3): on rank 0 the request in flight
    gets a 500; on either rank the whole job exits non-zero instead of hanging."""
    from _serving import serve_env as base_env

    env = {**base_env(), "MPISPLIT_FAULT": f"raise@rank={rank},step=3"}
    with Server(2, ["--ckpt", str(ckpt), "--dtype", "float64"], env=env) as srv:
        c = client(srv.url)
        if rank == 0:
            with pytest.raises(openai.InternalServerError, match="engine failed"):
                c.completions.create(model="char", prompt="a", max_tokens=20)
        else:
            with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
                c.completions.create(model="char", prompt="a", max_tokens=20, timeout=30)
        assert srv.proc.wait(timeout=30) != 0


@pytest.mark.timeout(300)
def test_four_ranks_greedy_equals_generate_and_concurrent_equals_alone(ckpt):
    """tp = 4 (oversubscribed on a small machine: MPICH yields instead of spinning)."""
    from _serving import serve_env as base_env

    env = {**base_env(), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    expected = generate_command(ckpt, PROMPTS[0], 10)
    with Server(4, ["--ckpt", str(ckpt), "--dtype", "float64", "--batch-invariant"], env=env) as srv:
        assert complete(srv.url, PROMPTS[0], max_tokens=10).choices[0].text == expected
        jobs = [{"prompt": p, "max_tokens": 5, "logprobs": 1} for p in PROMPTS[:3]]
        alone = [as_record(complete(srv.url, **job)) for job in jobs]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            together = [as_record(f.result()) for f in [pool.submit(complete, srv.url, **job) for job in jobs]]
        assert [r[0] for r in together] == [r[0] for r in alone]  # the text; logprobs to 1e-12
        for (_, _, a), (_, _, b) in zip(alone, together):
            assert np.allclose(a[0], b[0], atol=1e-12, rtol=0)
        assert srv.stop() == 0
