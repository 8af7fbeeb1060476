"""Tool calls through the official openai client: a server at tp = 2 whose chat template renders
tools in the Hermes layout (tests/_chat.py TOOLS_STYLE), on a tiny random GPT-2 (left alone it
never writes a call). tool_choice "required" and a named tool give calls every time, each naming
a tool and with arguments that validate against its parameters (jsonschema); streamed, the same
calls arrive as tool_calls deltas; the calls and their results go back into the conversation
through the template. The parsing of calls out of an answer (tool_choice "auto"), in both
layouts, against hand-written answers; Llama 3.1's bare-JSON layout forced in the engine."""

from __future__ import annotations

import json

import httpx
import pytest
from _chat import TOOLS_JSON_STYLE, TOOLS_STYLE, write_chat_folder
from _serving import Server, serve_env
from mpi4py import MPI

from mpisplit.serving.tools import ToolSpec, parse_calls

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(600)]
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# ASCII patterns: llguidance admits byte sequences that are not UTF-8 (a surrogate, a code point
# past U+10FFFF) inside a JSON string, which decode to several U+FFFD and so overrun a maxLength.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "hello"}]


def _check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / "tiny"
    write_chat_folder(folder, block_size=1024)[0].grid.free()  # the tools take ~650 tokens
    template = folder.parent / "tools.jinja"
    template.write_text(TOOLS_STYLE)
    args = ["--hf", str(folder), "--chat-template", str(template), "--max-batch", "4", "--model-name", "tiny"]
    with Server(2, args, env=serve_env()) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)


def test_required_and_named_calls_validate_every_time(client):
    required = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                              n=4, temperature=1.0, max_tokens=100, seed=1)
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, n=2, temperature=1.0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=100, seed=2)
    for choice in required.choices + named.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
    assert {c.message.tool_calls[0].function.name for c in named.choices} == {"add"}
    free = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=30, seed=1)
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content  # auto: text


def test_streamed_calls_are_tool_call_deltas(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=1.0, max_tokens=100, seed=3, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and len(deltas[0]) == 1 and deltas[0][0].index == 0
    _check_call(deltas[0][0])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, max_tokens=100, seed=3)
    assert whole.choices[0].message.tool_calls[0].function.arguments == deltas[0][0].function.arguments


def test_calls_and_results_go_back_into_the_conversation(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=100, seed=4)
    call = first.choices[0].message.tool_calls[0]
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    second = client.chat.completions.create(model="tiny", messages=turn, tools=TOOLS, max_tokens=5, seed=4)
    from mpisplit.models.chat_template import ChatTemplate

    rendered = ChatTemplate(TOOLS_STYLE).render(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {**call.model_dump(), "function": {"name": call.function.name,
                                               "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}], tools=TOOLS)
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in rendered
    root = str(client.base_url).rsplit("/v1", 1)[0]
    tokens = httpx.post(root + "/tokenize", json={"prompt": rendered, "add_special_tokens": False}, timeout=30).json()["count"]
    assert second.usage.prompt_tokens == tokens


def test_bad_tool_requests_are_400s(client):
    bad = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
           ({"tool_choice": "required"}, "needs 'tools'"),
           ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
           ({"tools": [TOOLS[0], TOOLS[0]]}, "twice"),
           ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "must be")]
    for extra, words in bad:
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, **extra)


def test_calls_are_read_out_of_answers():
    hermes, plain = ToolSpec(("get_weather", "add"), "hermes", True), ToolSpec(("add",), "json", True)
    content, calls = parse_calls('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                 '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',
                                 hermes)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    for text in ['<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "<tool_call>{not json</tool_call>",
                 "no call here", '<tool_call>{"name": "add", "arguments": 3}</tool_call>']:
        assert parse_calls(text, hermes) == (text, [])
    content, calls = parse_calls('{"name": "add", "parameters": {"a": 5, "b": 6}}', plain)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 5, "b": 6}
    assert parse_calls('{"name": "sub", "parameters": {}}', plain)[1] == []
    assert parse_calls('<tool_call>{"name": "add", "arguments": {}}</tool_call>',
                       ToolSpec(("add",), "hermes", False))[1] == []  # tool_choice "none"


def test_llama_layout_is_forced_in_the_engine(tmp_path):
    """The bare-JSON layout: validate_chat's grammar, drawn by the engine, read back by the layout."""
    from mpisplit.models.chat_template import ChatTemplate
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer
    from mpisplit.serving.chat import ChatLayout, validate_chat
    from mpisplit.serving.engine import Engine, SequenceSpec
    from mpisplit.serving.validation import ModelInfo

    model, _ = write_chat_folder(tmp_path / "tiny", block_size=1024)
    tok = load_hf_tokenizer(tmp_path / "tiny")
    info = ModelInfo("tiny", model.config.vocab_size, model.config.block_size, tok)
    req = validate_chat({"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 90,
                         "temperature": 1.0}, info, ChatTemplate(TOOLS_JSON_STYLE))
    assert req.tools.layout == "json"
    engine = Engine(model, max_batch=4, tokenizer=tok)
    for i in range(4):
        engine.add(SequenceSpec(i, req.prompt, req.max_tokens, req.sampling.__class__(
            **{**req.sampling.to_json(), "seed": i})))
    pieces: dict[int, list[dict]] = {i: [] for i in range(4)}
    while engine.running:
        for out in engine.step():
            pieces[out.rid].append({"text": tok.decode([out.token]), "finish_reason": out.reason,
                                    "logprobs": None})
    answer = ChatLayout("tiny", False, tools=req.tools).whole(list(pieces.values()), {})
    model.grid.free()
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
