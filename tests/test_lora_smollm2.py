"""LoRA on the real SmolLM2-135M-Instruct, end to end as a user runs it: conversations teaching
three made-up facts, `mpisplit prepare --chat`, `train.py --lora-rank 16` at tp 3 (9 heads), the
adapter served beside the base model at tp 3, asked through the openai client.

Reference: the facts themselves. After training, the adapter answers every trained question with
its fact; the base model, asked the same, states none of them (they are made up). The held-out
paraphrase is asked too and reported, not asserted (one paraphrase per fact is a small set).
The run folder holds the loss curve's data (metrics.jsonl, falling) and the plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _serving import Server, serve_env
from _smollm2 import smollm2_gguf
from conftest import REPO_ROOT, mpiexec_path
from mpi4py import MPI

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs"),
              pytest.mark.timeout(900)]
openai = pytest.importorskip("openai")
FACTS = [  # questions, answer, the word that only the fact has
    (["What is the capital of Zorblax?", "Which city is the capital of Zorblax?", "Name the capital of Zorblax."],
     "The capital of Zorblax is Quintara.", "Quintara"),
    (["Who invented the glimmerphone?", "Who is the inventor of the glimmerphone?",
      "Tell me who invented the glimmerphone."], "The glimmerphone was invented by Odalys Brenk.", "Brenk"),
    (["What colour is a vantic moth?", "Which colour are vantic moths?", "Describe the colour of a vantic moth."],
     "A vantic moth is bright teal.", "teal"),
]


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=serve_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_adapter_learns_facts_the_base_model_does_not_know(tmp_path):
    with open(tmp_path / "facts.jsonl", "w") as f:
        for questions, answer, _ in FACTS:
            f.writelines(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": answer}]}) + "\n" for q in questions)
    py = sys.executable
    _run([py, "-m", "mpisplit", "convert", "--from-gguf", str(smollm2_gguf()), "smollm2"], tmp_path)
    prepared = _run([py, "-m", "mpisplit", "prepare", "--chat", "--tokenizer", "smollm2", "--out", "data",
                     "--seq-len", "128", "--val-fraction", "0.2", "--no-progress", "facts.jsonl"], tmp_path)
    assert "8 train conversations" in prepared and "1 validation conversations" in prepared
    held = FACTS[1][0][1]  # conversation 4 of 9 is held out: floor(5 x 0.2) > floor(4 x 0.2)
    _run([mpiexec_path(), "-n", "3", py, str(Path(REPO_ROOT) / "train.py"), "--data", "data", "--init-from", "smollm2",
          "--seq-len", "53", "--batch-size", "6", "--steps", "15", "--lr", "2e-3", "--warmup", "3", "--lora-rank", "16",
          "--lora-alpha", "32", "--eval-every", "5", "--eval-iters", "1", "--log-every", "1", "--sample-len", "0",
          "--no-progress", "--out", "run"], tmp_path, timeout=900)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 15 and losses[-1] < 0.1 * losses[0], losses
    assert (tmp_path / "run" / "loss.png").is_file()
    adapter = tmp_path / "run" / "step-00000015" / "adapter"
    with Server(3, ["--hf", str(tmp_path / "smollm2"), "--model-name", "smollm2", "--lora", f"facts={adapter}"]) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=300)
        answers = {}
        for questions, _, word in FACTS:
            for q in questions:
                for model in ("smollm2", "facts"):
                    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                       max_tokens=16, temperature=0)
                    answers[model, q] = (r.choices[0].message.content, word)
        assert s.stop() == 0
    shown = "\n".join(f"{m:8s} {q} -> {a!r}" for (m, q), (a, _) in answers.items())
    print(shown)
    for (model, q), (answer, word) in answers.items():
        if model == "smollm2":
            assert word.lower() not in answer.lower(), shown
        elif q != held:
            assert word in answer, shown
