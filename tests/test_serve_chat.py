"""POST /v1/chat/completions on real servers, through the official openai client and httpx: a
tiny GPT-2 folder whose tokenizer_config.json carries a ChatML template (2 ranks), and a
character checkpoint given a template with --chat-template (1 rank). References: the library's
own greedy decoding of the conversation's ids (transformers' apply_chat_template ids where
installed), the completions route on the same ids, the same requests one at a time."""

from __future__ import annotations

import concurrent.futures
import functools

import httpx
import pytest
from _chat import CHAR_TEMPLATE, CONVERSATIONS, write_chat_folder
from _serving import CHARS, Server, greedy_reference, write_char_checkpoint
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    model, bpe = write_chat_folder(folder)
    yield folder, model, bpe
    model.grid.free()


@pytest.fixture(scope="module")
def server(chat_folder):
    folder, _, _ = chat_folder
    with Server(2, ["--hf", str(folder), "--dtype", "float64", "--model-name", "tiny-chat",
                    "--prefill-chunk", "16", "--batch-invariant"]) as srv:
        yield srv


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(url: str, messages: list[dict], **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 10)
    return client(url).chat.completions.create(model="tiny-chat", messages=messages, **kw)


@functools.cache
def _transformers_tokenizer(transformers, folder: str):
    return transformers.AutoTokenizer.from_pretrained(folder)


def conversation_ids(folder, messages: list[dict]) -> list[int]:
    """The prompt's ids by transformers' apply_chat_template (the independent reference; a skip
    naming it where transformers is missing)."""
    transformers = pytest.importorskip("transformers", reason="the reference ids are transformers' apply_chat_template")
    tok = _transformers_tokenizer(transformers, str(folder))
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_greedy_answers_equal_library_greedy_decoding(server, chat_folder):
    folder, model, bpe = chat_folder
    for name, messages in CONVERSATIONS.items():
        ids = conversation_ids(folder, messages)
        expected = bpe.decode(greedy_reference(model, ids, 10).tolist(), skip_special_tokens=False)
        resp = chat(server.url, messages)
        choice = resp.choices[0]
        assert choice.message.content == expected, name
        assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.index == 0
        assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "tiny-chat"
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 10)
        assert resp.usage.total_tokens == len(ids) + 10
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATIONS["multi-turn"]]
    assert chat(server.url, parts).choices[0].message.content == chat(
        server.url, CONVERSATIONS["multi-turn"]).choices[0].message.content


def test_stream_deltas_equal_the_whole_answer(server):
    for kw in ({}, {"temperature": 0.9, "seed": 3}, {"logprobs": True, "top_logprobs": 2}, {"stop": ["e"]}):
        messages = CONVERSATIONS["system"]
        whole = chat(server.url, messages, max_tokens=12, **kw)
        chunks = list(chat(server.url, messages, max_tokens=12, stream=True,
                           stream_options={"include_usage": True}, **kw))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        parts = [c.choices[0] for c in chunks[:-1]]
        assert "".join(p.delta.content or "" for p in parts) == whole.choices[0].message.content
        assert parts[-1].finish_reason == whole.choices[0].finish_reason
        assert all(p.finish_reason is None for p in parts[:-1])
        if "logprobs" in kw:
            streamed = [e for p in parts if p.logprobs for e in p.logprobs.content]
            assert streamed == whole.choices[0].logprobs.content and len(streamed) == 12


def test_logprobs_equal_the_completions_route_on_the_same_ids(server, chat_folder):
    folder, _, _ = chat_folder
    messages = CONVERSATIONS["one-turn"]
    resp = chat(server.url, messages, max_tokens=6, logprobs=True, top_logprobs=3)
    ref = client(server.url).completions.create(model="tiny-chat", prompt=conversation_ids(folder, messages),
                                                max_tokens=6, temperature=0, logprobs=3)
    content, lp = resp.choices[0].logprobs.content, ref.choices[0].logprobs
    assert resp.choices[0].message.content == ref.choices[0].text
    assert [e.token for e in content] == lp.tokens and [e.logprob for e in content] == lp.token_logprobs
    for e, top in zip(content, lp.top_logprobs):
        assert [(t.token, t.logprob) for t in e.top_logprobs] == list(top.items())
        assert e.bytes == list(e.token.encode())


def test_chat_output_does_not_depend_on_the_batch(server):
    jobs = [{"messages": m, "max_tokens": 8 + 2 * i, "logprobs": True} for i, m in enumerate(CONVERSATIONS.values())]
    jobs += [{"messages": m, "max_tokens": 10, "temperature": 1.0, "seed": 40 + i, "top_p": 0.9}
             for i, m in enumerate(CONVERSATIONS.values())]

    def record(job):
        c = chat(server.url, **job).choices[0]
        return c.message.content, None if c.logprobs is None else [e.logprob for e in c.logprobs.content]

    alone = [record(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(record, jobs))
    assert together == alone


LONG = [{"role": "user", "content": "Tell me a story about a fox. " * 30}]
BAD = [
    ({}, "messages", "missing"),
    ({"messages": []}, "messages", "empty"),
    ({"messages": "hello"}, "messages", "must be a list"),
    ({"messages": ["hello"]}, "messages", "'messages[0]' must be an object"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "'messages[0].role'"),
    ({"messages": [{"role": "user"}]}, "messages", "'messages[0].content' must be a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "'messages[0].content' must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "only text"),
    ({"messages": LONG}, "messages", "context is 128"),
    ({"messages": CONVERSATIONS["one-turn"], "max_tokens": 120}, "messages", "context is 128"),
    ({"messages": CONVERSATIONS["one-turn"], "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ({"messages": CONVERSATIONS["one-turn"], "top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ({"messages": CONVERSATIONS["one-turn"], "logprobs": 3}, "logprobs", "true or false"),
    ({"messages": CONVERSATIONS["one-turn"], "logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20"),
    ({"messages": CONVERSATIONS["one-turn"], "temperature": -1}, "temperature", ">= 0"),
    ({"messages": CONVERSATIONS["one-turn"], "n": 17}, "n", "<= 16"),
    ({"messages": CONVERSATIONS["one-turn"], "echo": True}, "echo", "/v1/completions field"),
    ({"messages": CONVERSATIONS["one-turn"], "model": "gpt-9"}, "model", "gpt-9"),
    ({"messages": CONVERSATIONS["one-turn"], "tools": [{"type": "function"}]}, "tools", "must be"),
    ({"messages": CONVERSATIONS["one-turn"], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "renders tools"),  # this template has no tools
    ({"messages": CONVERSATIONS["one-turn"], "functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ({"messages": CONVERSATIONS["one-turn"], "stream": "yes"}, "stream", "true or false"),
]


def test_bad_input_is_a_400_naming_the_field_and_the_server_goes_on(server, chat_folder):
    for body, param, needle in BAD:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-chat", **body}, timeout=30)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error", err
    with pytest.raises(openai.BadRequestError):
        chat(server.url, [])
    assert chat(server.url, CONVERSATIONS["one-turn"], max_tokens=2).choices[0].finish_reason == "length"
    # without max_tokens the answer may fill the rest of the context
    for n in range(1, 40):
        near = [{"role": "user", "content": "Tell me a story about a fox. " * n}]
        if len(conversation_ids(chat_folder[0], near)) > 120:
            break
    resp = chat(server.url, near, max_tokens=None)
    assert resp.usage.total_tokens == 128 and resp.choices[0].finish_reason == "length"
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'mpisplit_requests_total{outcome="length"}' in metrics


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-char")
    template = root / "chat.jinja"
    template.write_text(CHAR_TEMPLATE, encoding="utf-8")
    return write_char_checkpoint(root / "char"), template


def test_checkpoint_with_chat_template_file(char_ckpt):
    """--chat-template FILE on a character checkpoint: the answer is the library's greedy
    continuation of the rendered text; the template's raise_exception is a 400 with its message."""
    import mpisplit as ms
    from mpisplit.models.chat_template import load_chat_template
    from mpisplit.serving.loading import load_model_and_tokenizer

    ckpt, template = char_ckpt
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    text = load_chat_template(None, template).render(messages)
    assert text == "system says be kind\nuser says hi\nassistant says "
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    model, _, _ = load_model_and_tokenizer(grid, ckpt=str(ckpt), dtype="float64")
    expected = "".join(CHARS[t] for t in greedy_reference(model, [CHARS.index(c) for c in text], 12))
    grid.free()
    with Server(1, ["--ckpt", str(ckpt), "--dtype", "float64", "--chat-template", str(template)]) as srv:
        c = client(srv.url)
        resp = c.chat.completions.create(model="char", messages=messages, max_tokens=12, temperature=0)
        assert resp.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="must not open with an assistant message") as info:
            c.chat.completions.create(model="char", messages=[{"role": "assistant", "content": "hi"}])
        assert info.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError, match="not in the model's vocabulary"):
            c.chat.completions.create(model="char", messages=[{"role": "user", "content": "HELLO"}])
        assert c.chat.completions.create(model="char", messages=messages, max_tokens=3).choices[0].message.content


def test_no_template_is_a_400_on_the_chat_route_only():
    """In process, without an engine: the chat route refuses before anything is submitted."""
    from starlette.testclient import TestClient

    from mpisplit.serving.api import CompletionsApp
    from mpisplit.serving.validation import ModelInfo
    from mpisplit.training.data import CharTokenizer

    app = CompletionsApp(None, ModelInfo("m", len(CHARS), 64, CharTokenizer(CHARS))).app()
    r = TestClient(app).post("/v1/chat/completions", json={"messages": CONVERSATIONS["one-turn"]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "no chat template" in err["message"] and "--chat-template" in err["message"]
