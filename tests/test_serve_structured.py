"""Structured output through the official openai client: `chat.completions.parse` with a pydantic
model, `response_format` json_schema and json_object on both routes, vLLM's guided_choice and
guided_regex. Served: the real SmolLM2-135M-Instruct at tp = 1 and tp = 3 (its 9 heads do not
split in 2), and a tiny random GPT-2 with a chat template at tp = 2 (random weights: left alone
it writes no JSON at all). Every answer of every request must parse and validate (pydantic, and
`jsonschema` against the schema sent); the same requests without a grammar show that the check
can fail. The engine-level checks (any world size): tests/test_guided.py."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import pytest
from _serving import Server, serve_env
from _smollm2 import smollm2_gguf
from mpi4py import MPI

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(900)]
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytest.importorskip("gguf", reason="the gguf package reads the model file")


# Bounded ASCII text: llguidance admits byte sequences that are not UTF-8 (a surrogate, a code
# point past U+10FFFF) inside a JSON string; decoded, each becomes U+FFFD, and a maxLength counted
# in bytes by the grammar is overrun in characters. A pattern keeps the strings to what it names.
TEXT = r"^[A-Za-z0-9 ,.'()-]{{1,{}}}$"


class City(pydantic.BaseModel):
    """Every field bounded, so that a grammar-following answer fits MAX_TOKENS whatever is drawn."""

    name: str = pydantic.Field(pattern=TEXT.format(30))
    country: str = pydantic.Field(pattern=TEXT.format(30))
    founded: int = pydantic.Field(ge=-3000, le=2100)
    landmarks: list[Annotated[str, pydantic.Field(pattern=TEXT.format(40))]] = pydantic.Field(max_length=3)


MAX_TOKENS = 300  # more than the longest answer City allows has characters


ASKS = ["Describe Paris as JSON.", "Tell me about Tokyo.", "Give facts about Cairo.", "What about Lima?",
        "Describe the city of Oslo.", "Describe Sydney."]
OBJECT_ASKS = ["A JSON object with the keys name and age of Bob, who is 30.",
               "Write {\"city\": ..., \"country\": ...} for Rome.", "JSON for a red car: color and wheels."]
REGEX = r"(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), [0-9]{1,2} (am|pm)"
CHOICES = ["positive", "negative", "neutral"]


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _ask_all(client) -> dict:
    """Every kind of request, the chats six at a time (one batch in the engine)."""
    schema = {**City.model_json_schema(), "additionalProperties": False}  # as parse() sends it

    def parse(question: str):
        return client.chat.completions.parse(model="smollm2", messages=_chat(question), response_format=City,
                                             max_tokens=MAX_TOKENS, temperature=0.7, seed=len(question))

    def completion(seed: int):
        return client.completions.create(
            model="smollm2", prompt="<|im_start|>user\nA city as JSON<|im_end|>\n<|im_start|>assistant\n",
            max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}})

    with ThreadPoolExecutor(6) as pool:
        parsed = list(pool.map(parse, ASKS))
        completions = list(pool.map(completion, range(6)))
        objects = list(pool.map(lambda q: client.chat.completions.create(
            model="smollm2", messages=_chat(q), max_tokens=MAX_TOKENS, temperature=0,
            response_format={"type": "json_object"}), OBJECT_ASKS))
    choices = client.completions.create(model="smollm2", prompt="The movie was great. Sentiment:", max_tokens=8,
                                        n=4, temperature=1.0, extra_body={"guided_choice": CHOICES})
    regex = client.completions.create(model="smollm2", prompt="When shall we meet? Answer:", max_tokens=12, n=4,
                                      temperature=1.0, extra_body={"guided_regex": REGEX})
    free = client.completions.create(model="smollm2", prompt="When shall we meet? Answer:", max_tokens=12, n=4,
                                     temperature=1.0, seed=1)
    return {"parsed": parsed, "completions": completions, "objects": objects, "choices": choices,
            "regex": regex, "free": free, "schema": schema}


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def answers(request):
    args = ["--gguf", str(smollm2_gguf()), "--max-model-len", "512", "--max-batch", "6", "--model-name", "smollm2"]
    with Server(request.param, args, env=serve_env()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)
        got = _ask_all(client)
        with pytest.raises(openai.BadRequestError, match="guided_regex"):
            client.completions.create(model="smollm2", prompt="x", extra_body={"guided_regex": "(unclosed"})
        return got


def test_parse_gives_a_valid_pydantic_object_every_time(answers):
    for answer in answers["parsed"]:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, City), choice.message.content
        jsonschema.validate(json.loads(choice.message.content), answers["schema"])


def test_json_schema_on_completions_validates_every_time(answers):
    for answer in answers["completions"]:
        text = answer.choices[0].text
        assert answer.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), answers["schema"])
        City.model_validate_json(text)


def test_json_object_is_an_object_every_time(answers):
    for answer in answers["objects"]:
        assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_choice_and_regex(answers):
    assert [c.text in CHOICES for c in answers["choices"].choices] == [True] * 4
    assert all(re.fullmatch(REGEX, c.text) for c in answers["regex"].choices), [c.text for c in answers["regex"].choices]
    assert not any(re.fullmatch(REGEX, c.text) for c in answers["free"].choices)  # the check can fail


class Small(pydantic.BaseModel):
    word: str = pydantic.Field(pattern="^[a-z]{1,8}$")
    n: int = pydantic.Field(ge=0, le=99)
    kind: Literal["a", "b"]


def test_tiny_random_model_at_tp_2(tmp_path):
    """A model that writes noise still answers in the schema, every time, at tp = 2."""
    from _chat import write_chat_folder

    folder = tmp_path / "tiny"
    write_chat_folder(folder)
    strict = {**Small.model_json_schema(), "additionalProperties": False}
    schema = {"type": "json_schema", "json_schema": {"name": "small", "schema": strict}}
    with Server(2, ["--hf", str(folder), "--max-batch", "6", "--model-name", "tiny"], env=serve_env()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)
        with ThreadPoolExecutor(6) as pool:
            parsed = list(pool.map(lambda i: client.chat.completions.parse(
                model="tiny", messages=_chat("hello"), response_format=Small, max_tokens=60, temperature=1.0,
                seed=i), range(6)))
        texts = client.completions.create(model="tiny", prompt="the", max_tokens=60, n=6, temperature=1.0, seed=2,
                                          extra_body={"response_format": schema})
        free = client.completions.create(model="tiny", prompt="the", max_tokens=30, n=6, temperature=1.0, seed=2)
    assert all(isinstance(p.choices[0].message.parsed, Small) for p in parsed)
    for choice in texts.choices:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), strict)
    assert len({c.text for c in texts.choices}) > 1
    for choice in free.choices:
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(choice.text), strict)
