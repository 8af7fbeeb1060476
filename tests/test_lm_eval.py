"""lm-evaluation-harness end to end: its `local-completions` model (remote tokenizer: the server's
/tokenize, /detokenize and /tokenizer_info) scores a multiple-choice task and a rolling
loglikelihood (perplexity) task against a real server, and the scores equal lm-eval's own `hf`
model (transformers) on the same model.

The tasks live in tests/lm_eval_tasks (YAML and JSON lines; copied with absolute data paths, as
the `datasets` json loader resolves them from the working directory). Reference: every
per-example loglikelihood of lm-eval's `hf` model, and the same metrics: in float64 within 1e-9 on
a tiny random GPT-2 and within 1e-6 on a tiny random Llama (served at 1 and 2 ranks), within 2e-3 in float32
on the real SmolLM2-135M-Instruct (its GGUF file, which transformers dequantizes too). The
remote tokenizer adds no special tokens, so the `hf` model runs with add_bos_token=False.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from _chat import write_chat_folder
from _serving import Server
from mpi4py import MPI

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(900)]

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
NAMES = ["tiny_choice", "tiny_rolling"]


@pytest.fixture(scope="module")
def lm_eval():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module = pytest.importorskip("lm_eval", reason="the harness is the ref extra's lm-eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    return module


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    for name in NAMES:
        text = (TASKS / f"{name}.yaml").read_text()
        text = re.sub(rf"test: {name}\.jsonl", f"test: {TASKS / (name + '.jsonl')}", text)
        (out / f"{name}.yaml").write_text(text)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny random GPT-2 and a tiny random Llama (llama3 rope scaling, 2 KV heads), both with
    the byte-level BPE of tests/_chat.py."""
    from _chat import LLAMA3_STYLE, train_tokenizer, write_tokenizer_folder
    from _dense_llama import FAMILIES, arrays, write_folder

    root = tmp_path_factory.mktemp("lme")
    model, bpe = write_chat_folder(root / "gpt2")
    model.grid.free()
    bpe = train_tokenizer()  # Llama 3's layout: its template, <|begin_of_text|>, ending at <|eot_id|>
    bos, eos = bpe.token_to_id("<|begin_of_text|>"), bpe.token_to_id("<|eot_id|>")
    config = {**FAMILIES["llama"], "vocab_size": bpe.get_vocab_size(), "max_position_embeddings": 128,
              "bos_token_id": bos, "eos_token_id": eos}
    write_folder(root / "llama", config, arrays(config, seed=3))
    write_tokenizer_folder(root / "llama", bpe, LLAMA3_STYLE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


def evaluate(lm_eval, tasks: Path, model: str, args: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=NAMES, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks)))


def served_scores(lm_eval, tasks: Path, ranks: int, args: list[str]) -> dict:
    with Server(ranks, [*args, "--model-name", "tiny"]) as srv:
        return evaluate(lm_eval, tasks, "local-completions",
                        f"base_url={srv.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                        "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=128")


def assert_same_scores(served: dict, ref: dict, tol: float) -> None:
    for name in NAMES:
        got = [s["resps"] for s in served["samples"][name]]
        want = [s["resps"] for s in ref["samples"][name]]
        assert len(got) == len(want) > 0, name
        for g, w in zip(got, want):
            for (gv, *_), (wv, *_) in zip(_flat(g), _flat(w)):
                assert abs(gv - wv) <= tol * max(1.0, abs(wv)), (name, g, w)
        for metric, value in ref["results"][name].items():
            if isinstance(value, float):
                assert served["results"][name][metric] == pytest.approx(value, rel=tol), (name, metric)


# transformers' Llama computes RMSNorm and its rotary cos/sin in float32 (in float64 models too):
# its loglikelihoods differ from the float64 ones in the 8th digit.
TOLERANCE = {"gpt2": 1e-9, "llama": 1e-6}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_local_completions_scores_equal_transformers(lm_eval, tasks, folders, family, ranks) -> None:
    folder = folders[family]
    served = served_scores(lm_eval, tasks, ranks, ["--hf", str(folder), "--dtype", "float64"])
    ref = evaluate(lm_eval, tasks, "hf", f"pretrained={folder},dtype=float64,device=cpu,max_length=128,"
                   "add_bos_token=False")
    assert_same_scores(served, ref, TOLERANCE[family])


def test_real_model_scores_equal_transformers(lm_eval, tasks) -> None:
    """SmolLM2-135M-Instruct in float32: its GGUF served, its GGUF dequantized by transformers."""
    pytest.importorskip("gguf", reason="the gguf package reads the model file")
    from _smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    served = served_scores(lm_eval, tasks, 1, ["--gguf", str(gguf), "--dtype", "float32", "--max-model-len", "512"])
    ref = evaluate(lm_eval, tasks, "hf", f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,"
                   "device=cpu,max_length=128,add_bos_token=False")
    assert_same_scores(served, ref, 2e-3)


def _flat(resps: list) -> list[tuple]:
    """[(loglikelihood, ...)] of one sample's responses (choice lists or a rolling value)."""
    out = []
    for r in resps:
        r = r[0] if isinstance(r, list) else r
        out.append(tuple(r) if isinstance(r, tuple) else (r,))
    return out
