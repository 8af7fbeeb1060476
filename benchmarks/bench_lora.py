"""LoRA against full fine-tuning, ours and PEFT + PyTorch's on the same Llama shapes: the step
time (forward, backward, AdamW) and the peak memory of one process, one thread.

Each case runs in a process of its own (so ru_maxrss is its own peak): it loads its libraries
(and warms our compiled kernels), builds the model, takes 2 warm-up steps and times `--steps`
more; it reports the median step, the peak RSS minus the RSS after the libraries were loaded
(the model's weights, gradients, optimizer state and activations), the trained parameters and
the optimizer's state bytes.
Ratios compare cases of the same run (the machine is shared: see RESULTS.md).

  python benchmarks/bench_lora.py            # hidden 512, 4 layers, rank 16, all-linear
  python benchmarks/bench_lora.py --smoke    # a small model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

FULL = {"vocab": 4096, "hidden": 512, "layers": 4, "heads": 8, "kv": 2, "ffn": 1408, "seq": 128, "batch": 4}
SMOKE = {"vocab": 64, "hidden": 32, "layers": 2, "heads": 4, "kv": 2, "ffn": 48, "seq": 16, "batch": 2}
CASES = ("ours-lora", "ours-full", "torch-lora", "torch-full")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ours(shape: dict, rank: int, lora: bool) -> tuple[Any, Any]:
    from mpi4py import MPI

    from mpisplit.models.config import GPTConfig
    from mpisplit.models.gpt import GPT
    from mpisplit.models.lora import apply_lora
    from mpisplit.nn.lora import LoraConfig
    from mpisplit.parallel.grid import ProcessGrid
    from mpisplit.training.optim import AdamW
    from mpisplit.training.step import StepRunner

    grid = ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = GPTConfig.llama(vocab_size=shape["vocab"], block_size=shape["seq"], n_layer=shape["layers"],
                          n_head=shape["heads"], n_embd=shape["hidden"], n_kv_head=shape["kv"],
                          intermediate_size=shape["ffn"])
    model = GPT(cfg, grid, dtype="float32", seed=0)
    if lora:
        apply_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank), seed=0)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt, runner = AdamW(trained, lr=1e-4), StepRunner(model, grid)

    def step(x: np.ndarray, y: np.ndarray) -> float:
        loss = runner.forward_backward(x, y)
        opt.step()
        opt.zero_grad()
        return loss

    return step, {"trained": sum(p.size for p in trained), "state_bytes": 2 * sum(p.data.nbytes for p in trained)}


def _torch(shape: dict, rank: int, lora: bool) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv"], max_position_embeddings=shape["seq"])
    model = LlamaForCausalLM(cfg)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                           lora_dropout=0.0))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4)

    def step(x: np.ndarray, y: np.ndarray) -> float:
        logits = model(input_ids=torch.as_tensor(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(y).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, {"trained": sum(p.numel() for p in trained), "state_bytes": 2 * sum(p.numel() * 4 for p in trained)}


def _load_libraries(case: str) -> None:
    """Imports (and our compiled kernels) before the memory baseline: they are no model's."""
    if case.startswith("ours"):
        from mpi4py import MPI  # noqa: F401

        from mpisplit import kernels
        from mpisplit.training import step  # noqa: F401

        kernels.warm_up(np.float32)
    else:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401


def run_case(case: str, shape: dict, rank: int, steps: int) -> dict:
    """One case in this process: median step seconds and peak memory over the model's baseline."""
    _load_libraries(case)
    base = _rss_now()
    build = _ours if case.startswith("ours") else _torch
    step, sizes = build(shape, rank, case.endswith("lora"))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, shape["vocab"], size=(2, shape["batch"], shape["seq"]))
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        loss = step(x, y)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "step_s": statistics.median(times), "peak_mib": (peak - base) / 2**20,
            "loss": loss, **sizes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a small model, seconds")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (after 2 warm-up steps)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--case", help=argparse.SUPPRESS)  # the child process's one case
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args()
    shape = SMOKE if args.smoke else FULL
    if args.case:
        print(json.dumps(run_case(args.case, shape, args.rank, args.steps)))
        return 0
    env = {**os.environ, **{k: "1" for k in common.THREAD_ENV_VARS}, "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--case", case, "--rank", str(args.rank), "--steps", str(args.steps),
               *(["--smoke"] if args.smoke else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode:
            print(f"{case}: exit {done.returncode}\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{case:11s} step {r['step_s'] * 1e3:8.1f} ms  peak +{r['peak_mib']:7.1f} MiB  trained "
              f"{r['trained']:>10,}  optimizer state {r['state_bytes'] / 2**20:7.2f} MiB", flush=True)
    by = {r["case"]: r for r in rows}
    ratios = {}
    for a, b in (("ours-lora", "ours-full"), ("ours-lora", "torch-lora"), ("ours-full", "torch-full")):
        if a in by and b in by:
            ratios[f"{a}/{b}"] = {"time": by[a]["step_s"] / by[b]["step_s"], "peak": by[a]["peak_mib"] / by[b]["peak_mib"]}
            print(f"{a} / {b}: time {ratios[f'{a}/{b}']['time']:.2f}x, peak memory {ratios[f'{a}/{b}']['peak']:.2f}x")
    out = common.write_json(args.out / "bench_lora.json", {"machine": common.machine_info(), "shape": shape,
                                                           "rank": args.rank, "rows": rows, "ratios": ratios})
    print(f"-> {out} ({common.machine_info()['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
