"""lm-evaluation-harness end to end: its `local-completions` model (remote tokenizer: the server's
/tokenize, /detokenize and /tokenizer_info) scores a multiple-choice task and a rolling
loglikelihood (perplexity) task against a real server, and the scores equal lm-eval's own `hf`
model (transformers) on the same folder.

The tasks live in tests/lm_eval_tasks (YAML and JSON lines; copied with absolute data paths, as
the `datasets` json loader resolves them from the working directory). Reference: every
per-example loglikelihood of lm-eval's `hf` model in float64 within 1e-9, and the same metrics.
The remote tokenizer adds no special tokens, so the `hf` model runs with add_bos_token=False.
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
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lme") / "tiny"
    model, _ = write_chat_folder(folder)
    model.grid.free()
    return folder


def evaluate(lm_eval, tasks: Path, model: str, args: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=NAMES, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks)))


@pytest.mark.parametrize("ranks", [1, 2])
def test_local_completions_scores_equal_transformers(lm_eval, tasks, folder, ranks) -> None:
    with Server(ranks, ["--hf", str(folder), "--dtype", "float64", "--model-name", "tiny"]) as srv:
        served = evaluate(lm_eval, tasks, "local-completions",
                          f"base_url={srv.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                          "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=128")
    ref = evaluate(lm_eval, tasks, "hf", f"pretrained={folder},dtype=float64,device=cpu,max_length=128,"
                   "add_bos_token=False")
    for name in NAMES:
        got = [s["resps"] for s in served["samples"][name]]
        want = [s["resps"] for s in ref["samples"][name]]
        assert len(got) == len(want) > 0, name
        for g, w in zip(got, want):
            for (gv, *_), (wv, *_) in zip(_flat(g), _flat(w)):
                assert abs(gv - wv) <= 1e-9 * max(1.0, abs(wv)), (name, g, w)
        for metric, value in ref["results"][name].items():
            if isinstance(value, float):
                assert served["results"][name][metric] == pytest.approx(value, rel=1e-9), (name, metric)


def _flat(resps: list) -> list[tuple]:
    """[(loglikelihood, ...)] of one sample's responses (choice lists or a rolling value)."""
    out = []
    for r in resps:
        r = r[0] if isinstance(r, list) else r
        out.append(tuple(r) if isinstance(r, tuple) else (r,))
    return out
