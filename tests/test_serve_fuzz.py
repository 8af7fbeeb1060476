"""A fuzzer against a real server (hypothesis, bounded): every body sent to every POST route is
answered 200 or with the error JSON of a 4xx naming what is wrong, never a 500 and never a bare
text page, and the server stays healthy. Bodies: the routes' own fields with values of every JSON
type (lone surrogates, huge and negative numbers, deep nesting, wrong types), and raw bytes.

Findings kept as regression cases (test_the_fuzzers_findings_are_400s): a lone surrogate
"\\ud800" in a prompt that the tokenizers library encodes, and a body nested 100,000 levels
deep, were bare 500s.
"""

from __future__ import annotations

import json

import httpx
import pytest
from _chat import TOOLS_STYLE, write_chat_folder
from _serving import Server
from mpi4py import MPI

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzer is hypothesis (test extra)")
st = hypothesis.strategies

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(600)]

ROUTES = {
    "/v1/completions": ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "logprobs", "echo", "stop",
                        "seed", "stream", "logit_bias", "prompt_logprobs", "min_tokens", "stop_token_ids", "model",
                        "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                        "structured_outputs"],
    "/v1/chat/completions": ["messages", "max_tokens", "max_completion_tokens", "temperature", "logprobs",
                             "top_logprobs", "n", "stop", "response_format", "tools", "tool_choice", "model"],
    "/tokenize": ["prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"],
    "/detokenize": ["tokens"],
}

# Text of letters, spaces, controls and lone surrogates (hypothesis leaves surrogates out unless asked).
text = st.text(alphabet=st.characters(categories=["Cs", "Ll", "Zs", "Cc", "Po"]), max_size=12)
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False) | text | st.sampled_from(["the cat", "", "\x00"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6) | st.sampled_from(["role", "content", "type"]),
                                        inner, max_size=4), max_leaves=12)


# JSON schemas, valid or not: types right and wrong, patterns of hostile text, nesting.
leaf_schema = st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "boolean", "nonsense"])},
                                    optional={"pattern": text, "maxLength": st.integers(-3, 5),
                                              "enum": st.lists(scalars, max_size=3)})
schemas = st.recursive(leaf_schema, lambda inner: st.fixed_dictionaries(
    {"type": st.just("object")}, optional={"properties": st.dictionaries(text, inner, max_size=3),
                                           "required": st.lists(text, max_size=2)})
    | st.fixed_dictionaries({"type": st.just("array"), "items": inner}), max_leaves=6)
tool_names = st.sampled_from(["f", "g", "bad name"]) | text
tools = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": tool_names}, optional={"parameters": schemas, "description": text})}), max_size=3)
OWN = {
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
        optional={"json_schema": st.fixed_dictionaries({"name": text}, optional={"schema": schemas | values})}),
    "guided_json": schemas, "guided_regex": text | st.sampled_from(["[a-z]+", "(", "a{9999999}", "(?<=a)b"]),
    "guided_choice": st.lists(text, max_size=3), "guided_grammar": text | st.just('start: "a" | "b"'),
    "structured_outputs": st.dictionaries(st.sampled_from(["json", "regex", "choice", "grammar", "x"]),
                                          text | schemas, max_size=2),
    "tools": tools,
    "tool_choice": st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": tool_names})}),
}


def field(name: str):
    """Values for one field: its own shape with hostile text, or any JSON value."""
    if name in OWN:
        own = OWN[name]
    elif name == "prompt":
        own = text | st.lists(st.integers(-5, 200), max_size=6) | st.lists(text, max_size=3)
    elif name == "messages":
        roles = st.sampled_from(["user", "system", "assistant", "tool"]) | text
        calls = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": tool_names, "arguments": text | st.just('{"a": 1}') | values})}), max_size=2)
        own = st.lists(st.fixed_dictionaries({"role": roles, "content": text | values},
                                             optional={"tool_calls": calls | values, "tool_call_id": text}),
                       max_size=3)
    elif name in ("max_tokens", "max_completion_tokens", "n"):
        own = st.integers(1, 3)
    elif name == "tokens":
        own = st.lists(st.integers(-5, 200) | values, max_size=6)
    else:
        own = text
    return own | values


def bodies(fields: list[str]):
    return st.fixed_dictionaries({}, optional={f: field(f) for f in fields})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny GPT-2 folder with a BPE tokenizer (the tokenizers library) and a chat template that
    renders tools (so that tool requests reach the template and the grammar)."""
    folder = tmp_path_factory.mktemp("fuzz") / "tiny-chat"
    model, _ = write_chat_folder(folder, block_size=1024)
    model.grid.free()
    (folder.parent / "tools.jinja").write_text(TOOLS_STYLE)
    with Server(1, ["--hf", str(folder), "--model-name", "tiny", "--chat-template",
                    str(folder.parent / "tools.jinja")]) as srv:
        yield srv


def check(url: str, route: str, content: bytes) -> None:
    r = httpx.post(url + route, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (route, content[:300], r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]  # the error JSON, not a bare page
        assert isinstance(err["message"], str) and err["message"], r.text


@pytest.mark.parametrize("route", list(ROUTES))
def test_no_body_gets_a_500_and_the_server_lives(server, route) -> None:
    settings = hypothesis.settings(max_examples=100, deadline=None, derandomize=True, database=None,
                                   suppress_health_check=list(hypothesis.HealthCheck))

    @settings
    @hypothesis.given(bodies(ROUTES[route]))
    def fuzz(body: dict) -> None:
        text = json.dumps(body, ensure_ascii=True)  # \ud800 travels as its JSON escape
        check(server.url, route, text.encode())

    fuzz()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_raw_bytes_are_a_400(server) -> None:
    settings = hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)

    @settings
    @hypothesis.given(st.binary(max_size=64))
    def fuzz(raw: bytes) -> None:
        for route in ROUTES:
            check(server.url, route, raw)

    fuzz()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("content", [
    b'{"prompt": "a\\ud800", "max_tokens": 1}',  # a lone surrogate: the tokenizer's encode failed (500)
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # the JSON decoder's recursion (500)
    b'{"model": "tiny\\udfff"}',
])
def test_the_fuzzers_findings_are_400s(server, content) -> None:
    for route in ROUTES:
        check(server.url, route, content)
        assert httpx.post(server.url + route, content=content, timeout=60).status_code == 400
