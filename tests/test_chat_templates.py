"""Chat templates: rendering and tokenization against transformers' `apply_chat_template` on the
same files (tokenizer.json + tokenizer_config.json read by both), for the SmolLM2 template and
templates in the style of Llama 3 and Qwen2, one turn, with a system message and multi-turn;
where the template comes from; what a failing template gives."""

from __future__ import annotations

import json

import pytest
from _chat import (
    CONVERSATIONS,
    LLAMA3_STYLE,
    QWEN2_STYLE,
    SMOLLM2,
    SPECIAL,
    TOJSON_STYLE,
    train_tokenizer,
    write_tokenizer_folder,
)

from mpisplit.models.chat_template import ChatTemplate, ChatTemplateError, load_chat_template

pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")

TEMPLATES = {"smollm2": SMOLLM2, "llama3-style": LLAMA3_STYLE, "qwen2-style": QWEN2_STYLE,
             "tojson": TOJSON_STYLE}
TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "__type": "AddedToken"},
          "pad_token": "<|im_end|>"}


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer()


@pytest.fixture(scope="module")
def folders(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {name: write_tokenizer_folder(root / name, bpe, text, **TOKENS) for name, text in TEMPLATES.items()}


@pytest.fixture(scope="module")
def references(folders):
    """transformers' tokenizer of each folder."""
    transformers = pytest.importorskip("transformers")
    return {name: transformers.AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}


def ours(folder, messages):
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer

    text = load_chat_template(folder).render(messages)
    return text, load_hf_tokenizer(folder).encode(text).tolist()


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_rendering_and_ids_equal_transformers(folders, references, template, conversation):
    messages = CONVERSATIONS[conversation]
    if template == "tojson":
        messages = [*messages, {"role": "user", "content": "<b>café</b> & 'quotes' \"too\""}]
    ref = references[template]
    text, ids = ours(folders[template], messages)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == list(ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_special_tokens_parsed_once_and_no_second_bos(folders, bpe):
    text, ids = ours(folders["llama3-style"], CONVERSATIONS["system"])
    special = {bpe.token_to_id(t): t for t in SPECIAL}
    bos = bpe.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert bpe.encode(text).ids[:2] == [bos, bos]  # what adding special tokens again would give
    assert "".join(special[i] for i in ids if i in special) == "".join(
        t for t in _special_sequence(text) if t in SPECIAL)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: ")
    assert "You tell stories.<|eot_id|>" in text  # the system message trimmed, as the template says


def _special_sequence(text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        hit = next((t for t in SPECIAL if text.startswith(t, i)), None)
        out.append(hit or text[i])
        i += len(hit) if hit else 1
    return out


def test_qwen2_style_default_system_and_whitespace(folders):
    text, _ = ours(folders["qwen2-style"], CONVERSATIONS["one-turn"])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Hello there, how are you today?<|im_end|>\n<|im_start|>assistant\n")
    with_system, _ = ours(folders["qwen2-style"], CONVERSATIONS["system"])
    assert "You are a helpful assistant." not in with_system


def test_tojson_does_not_escape_html(folders):
    text, _ = ours(folders["tojson"], [{"role": "user", "content": "<b>café</b>"}])
    assert text == '{"role": "user", "content": "<b>café</b>"}\n<|eot_id|>'


def test_template_sources(tmp_path, bpe):
    """chat_template.jinja over tokenizer_config.json; a list of named templates gives
    "default"; --chat-template FILE over both; a folder without one gives None."""
    folder = write_tokenizer_folder(tmp_path / "named", bpe, [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ bos_token }}"}],
        bos_token="<s>")
    assert load_chat_template(folder).render([]) == "default <s>"
    (folder / "chat_template.jinja").write_text("jinja file", encoding="utf-8")
    assert load_chat_template(folder).render([]) == "jinja file"
    own = tmp_path / "own.jinja"
    own.write_text("{{ messages | length }} {{ bos_token }}", encoding="utf-8")
    assert load_chat_template(folder, own).render([{"role": "user", "content": "x"}]) == "1 <s>"
    assert load_chat_template(None, own).render([]) == "0 "  # a checkpoint: no special tokens
    assert load_chat_template(write_tokenizer_folder(tmp_path / "none", bpe, None)) is None
    assert load_chat_template(None) is None


def test_template_errors(tmp_path, bpe):
    no_default = write_tokenizer_folder(tmp_path / "nodefault", bpe, [{"name": "rag", "template": "x"}])
    with pytest.raises(ValueError, match=r"named \['rag'\] and none is 'default'"):
        load_chat_template(no_default)
    with pytest.raises(ValueError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}", origin="'t'")
    with pytest.raises(FileNotFoundError, match="nope.jinja"):
        load_chat_template(None, tmp_path / "nope.jinja")
    bad = write_tokenizer_folder(tmp_path / "bad", bpe, 5)
    with pytest.raises(TypeError, match="must be a string or a list"):
        load_chat_template(bad)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read"):
        load_chat_template(tmp_path / "broken")
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="^roles must alternate$"):
        raising.render([])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ 'a' + messages[0]['content'] }}").render([{"role": "user", "content": 5}])
    sandboxed = ChatTemplate("{{ messages.append(1) }}")  # immutable sandbox: no mutation of the input
    with pytest.raises(ChatTemplateError, match="append"):
        sandboxed.render([])
    assert json.loads(ChatTemplate("{{ messages | tojson }}").render([{"a": 1}])) == [{"a": 1}]
