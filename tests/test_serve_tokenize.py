"""POST /tokenize, POST /detokenize and GET /tokenizer_info on real servers (httpx).

References: transformers' AutoTokenizer of the same tiny GPT-2 folder (encode with and without
special tokens, apply_chat_template, decode), the character model's own alphabet (an id is a
character's index), the folder's tokenizer_config.json for the special tokens and the template.
"""

from __future__ import annotations

import json

import httpx
import pytest
from _chat import CONVERSATIONS, write_chat_folder
from _serving import CHARS, Server, write_char_checkpoint
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tiny-chat"
    model, _ = write_chat_folder(folder)
    model.grid.free()
    return folder


@pytest.fixture(scope="module")
def hf_server(folder):
    with Server(1, ["--hf", str(folder), "--dtype", "float64"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(folder):
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer is transformers'")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(url + route, json=body, timeout=30)


def test_tokenize_and_detokenize_equal_transformers(hf_server, reference) -> None:
    text = "Hello there, how are you today? A fox."
    plain = post(hf_server.url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == reference(text, add_special_tokens=False)["input_ids"]
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 128
    default = post(hf_server.url, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert default["tokens"] == reference(text)["input_ids"]  # special tokens added, as vLLM's default
    assert "".join(default["token_strs"]) == reference.decode(default["tokens"])
    back = post(hf_server.url, "/detokenize", {"tokens": plain["tokens"]}).json()
    assert back["prompt"] == reference.decode(plain["tokens"]) == text


def test_tokenize_messages_equals_apply_chat_template(hf_server, reference) -> None:
    for name, messages in CONVERSATIONS.items():
        got = post(hf_server.url, "/tokenize", {"messages": messages}).json()
        want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert got["tokens"] == list(want), name
        bare = post(hf_server.url, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
        want = reference.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert bare["tokens"] == list(want), name


def test_tokenizer_info_is_the_folders(hf_server, folder) -> None:
    info = httpx.get(hf_server.url + "/tokenizer_info", timeout=30).json()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert info["chat_template"] == config["chat_template"]
    assert info["bos_token"] == config["bos_token"] == "<|begin_of_text|>"
    assert info["model_max_length"] == 128 and info["tokenizer_class"] == "HFTokenizer"


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": []}, "messages"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"messages": "hi"}, "messages"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
])
def test_bad_requests_are_a_400_naming_the_field(hf_server, route, body, param) -> None:
    r = post(hf_server.url, route, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_character_model_tokenizes_by_its_alphabet(tmp_path) -> None:
    ckpt = write_char_checkpoint(tmp_path / "char", eos_token_ids=[3])
    with Server(1, ["--ckpt", str(ckpt)]) as srv:
        text = "the cat"
        got = post(srv.url, "/tokenize", {"prompt": text}).json()
        assert got["tokens"] == [CHARS.index(c) for c in text]
        assert post(srv.url, "/detokenize", {"tokens": got["tokens"]}).json() == {"prompt": text}
        info = httpx.get(srv.url + "/tokenizer_info", timeout=30).json()
        assert info["eos_token_ids"] == [3] and info["eos_token"] == CHARS[3] and info["chat_template"] is None
        r = post(srv.url, "/tokenize", {"prompt": "Z"})  # not in the alphabet
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = post(srv.url, "/tokenize", {"messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
