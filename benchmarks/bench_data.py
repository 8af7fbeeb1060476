"""Data at scale: does training from a prepared corpus cost the same memory whatever its size,
what share of a step does the data take, and how fast is `mpisplit prepare`?

    python benchmarks/bench_data.py                  # 2 GB vs 2 MB corpus, then prepare's MB/s
    python benchmarks/bench_data.py --part memory    # one part
    python benchmarks/bench_data.py --smoke          # small sizes, seconds

memory: two corpora in the prepared format with uniform random tokens (vocabulary 8192, uint16),
written with the same shard writer `mpisplit prepare` uses, one of `--big-gb` GB (in a temporary
folder, deleted afterwards) and one of 2 MB; the same training run (2 ranks, dp=2) on each; every
rank reports its peak RSS (VmHWM) and the time of its batch copies against the time of a step.
prepare: a folder of text files (CPython's documentation paragraphs, shuffled and repeated to
`--prepare-mb`), a byte-level BPE of 8192 tokens trained on the same text; in one process, rounds
alternating: the `tokenizers` single-thread encode rate (encode_batch, TOKENIZERS_PARALLELISM=false)
over the same documents in memory, and `prepare` at 1 and at N workers (input MB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

VOCAB = 8192
MODEL = {"layers": 2, "hidden": 128, "heads": 4, "seq_len": 128, "batch_size": 16}


# ---- memory and the data share of a step -------------------------------------------------------


def synthetic_corpus(folder: Path, tokens: int, seed: int = 0) -> Path:
    """A prepared corpus of `tokens` uniform random training tokens in documents of ~1M tokens
    (eos = 0 after each), and 100k validation tokens."""
    from mpisplit.data.manifest import FORMAT, MANIFEST
    from mpisplit.data.shards import SplitWriter, entropy_of_counts

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    parts = {}
    counts = None
    for split, n in (("train", tokens), ("val", 100_000)):
        writer = SplitWriter(folder, split, "uint16", VOCAB, 1 << 30)
        while writer.tokens < n:
            doc = rng.integers(1, VOCAB, size=min(1 << 20, n - writer.tokens), dtype=np.uint16)
            doc[-1] = 0
            writer.add(doc)
        if split == "train":
            counts = writer.counts
        parts[split] = writer.close()
    manifest = {"format": FORMAT, "tokenizer": {"files": {}, "vocab_size": VOCAB, "eos_id": 0}, "dtype": "uint16",
                "val_fraction": 0.0, **parts, "train_unigram_entropy": entropy_of_counts(counts), "field": "text"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def memory_child(corpus: str, out: str, steps: int, keep_pages: bool) -> None:
    """Under mpiexec: train `steps` steps from `corpus`, then time the batch copies alone."""
    from mpi4py import MPI

    from mpisplit.runtime.faults import JobGuard
    from mpisplit.training.config import TrainConfig
    from mpisplit.training.trainer import Trainer

    world = MPI.COMM_WORLD
    config = TrainConfig(data=corpus, steps=steps, out=out + ".run",
                         progress=False, sample_len=0, plot=False, eval_every=0, warmup=2, dp=world.Get_size(),
                         tp=1, **MODEL)
    if keep_pages:  # the comparison: mapped pages stay resident once a window has touched them
        from mpisplit.data.tokens import ShardedTokens

        ShardedTokens._release = lambda self, k, lo, n: None
    guard = JobGuard(world)
    try:
        t0 = time.perf_counter()
        trainer = Trainer(config, world, guard)  # includes each rank's share of the sha256 checks
        start_s = time.perf_counter() - t0
        after_start = _status_kib()
        step_times = []
        for done in range(1, steps + 1):
            world.Barrier()
            t0 = time.perf_counter()
            trainer.train_step(done)
            step_times.append(time.perf_counter() - t0)
        grid, c = trainer.grid, config
        batch_times = []
        for step in range(steps, 3 * steps):
            t0 = time.perf_counter()
            trainer.data.batch("train", c.seed, step, c.batch_size, c.seq_len, grid.dp_rank, grid.dp)
            batch_times.append(time.perf_counter() - t0)
        row = {"rank": world.Get_rank(), "train_tokens": len(trainer.data.train), **_status_kib(),
               "after_start_VmHWM_kib": after_start["VmHWM_kib"], "start_s": start_s,
               "step_s": statistics.median(step_times[1:]), "batch_s": statistics.median(batch_times)}
        rows = world.gather(row)
        trainer.grid.free()
    finally:
        guard.close()
    shutil.rmtree(config.out, ignore_errors=True)
    if world.Get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def _status_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[f"{key}_kib"] = int(value.split()[0])
    return fields


def memory_part(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sizes = {"small": 1_000_000, "big": int(args.big_gb * 1e9 / 2)}  # uint16 tokens: 2 MB, big_gb GB
    runs = {}
    for name in ("small", "big"):
        corpus = scratch / f"corpus-{name}"
        t0 = time.perf_counter()
        synthetic_corpus(corpus, sizes[name])
        written = time.perf_counter() - t0
        report = scratch / f"memory-{name}.json"
        try:
            argv = [__file__, "--child-memory", str(corpus), str(report), str(args.steps)]
            argv += ["--keep-pages"] if args.keep_pages else []
            code = common.run_under_mpi(2, argv, threads=1, timeout=args.timeout)
            if code != 0:
                raise SystemExit(f"memory run on the {name} corpus failed with exit {code}")
            rows = json.loads(report.read_text())
        finally:
            shutil.rmtree(corpus, ignore_errors=True)  # the big corpus lives only for its run
        runs[name] = {"corpus_bytes": sizes[name] * 2, "write_s": written, "ranks": rows}
    peak = {n: max(r["VmHWM_kib"] for r in runs[n]["ranks"]) for n in runs}
    share = max(r["batch_s"] / r["step_s"] for r in runs["big"]["ranks"])
    return {"runs": runs, "peak_rss_mib": {n: v / 1024 for n, v in peak.items()},
            "peak_rss_difference_mib": (peak["big"] - peak["small"]) / 1024, "data_share_of_step": share}


# ---- prepare's throughput -----------------------------------------------------------------------


def text_folder(folder: Path, megabytes: float, seed: int = 0) -> list[str]:
    """Files of ~16 paragraphs each, to `megabytes` in all; returns the documents."""
    from mpisplit.training.data import default_corpus

    paragraphs = [p for p in default_corpus().split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    docs, size = [], 0
    while size < megabytes * 1e6:
        doc = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), size=16))
        (folder / f"{len(docs):06d}.txt").write_text(doc, encoding="utf-8")
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


def train_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mpisplit.training.data import default_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_corpus()], trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def encode_rate(tok_folder: Path, docs: list[str]) -> tuple[float, float]:
    """(bytes per second, bytes per CPU second) of one thread's encode_batch over the documents
    (about 1 MB a call)."""
    from mpisplit.data.encode import text_batches
    from mpisplit.data.tokenizer import open_tokenizer

    tok = open_tokenizer(tok_folder).tokenizer.tokenizer
    batches = [texts for texts, _ in text_batches(_Doc(d) for d in docs)]
    size = sum(len(d.encode("utf-8")) for d in docs)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for texts in batches:
        tok.encode_batch(texts, add_special_tokens=False)
    return size / (time.perf_counter() - t0), size / (_cpu_seconds() - c0)


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (prepare's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Doc:
    def __init__(self, text: str) -> None:
        self.text, self.disk_bytes = text, 0


def prepare_rate(tok_folder: Path, inputs: Path, out: Path, workers: int) -> tuple[float, float]:
    from mpisplit.data.prepare import PrepareOptions, prepare

    size = sum(p.stat().st_size for p in inputs.iterdir())
    t0, c0 = time.perf_counter(), _cpu_seconds()
    prepare([inputs], tok_folder, out, PrepareOptions(workers=workers, progress=False))
    rates = size / (time.perf_counter() - t0), size / (_cpu_seconds() - c0)
    shutil.rmtree(out)
    return rates


def prepare_part(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the single-thread rate (workers set it themselves)
    tok = train_tokenizer(scratch / "tok")
    docs = text_folder(scratch / "texts", args.prepare_mb)
    workers = args.workers or common.default_threads(1)
    names = ["encode_1_thread", "prepare_1_worker", f"prepare_{workers}_workers"]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.rounds):  # alternated, so that load on the machine hits each alike
        for name, run in zip(names, (lambda: encode_rate(tok, docs),
                                     lambda: prepare_rate(tok, scratch / "texts", scratch / "out", 1),
                                     lambda: prepare_rate(tok, scratch / "texts", scratch / "out", workers))):
            w, c = run()
            wall[name].append(w / 1e6)
            cpu[name].append(c / 1e6)
    median = {k: statistics.median(v) for k, v in wall.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    base = median["encode_1_thread"]
    return {"input_mb": sum(len(d.encode()) for d in docs) / 1e6, "documents": len(docs), "workers": workers,
            "rounds_mb_per_s": wall, "rounds_mb_per_cpu_s": cpu, "median_mb_per_s": median,
            "median_mb_per_cpu_s": median_cpu, "ratio_1_worker": median["prepare_1_worker"] / base,
            "ratio_workers": median[f"prepare_{workers}_workers"] / (workers * base),
            "cpu_efficiency_workers": median_cpu[f"prepare_{workers}_workers"] / median_cpu["encode_1_thread"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "memory", "prepare"], default="all")
    p.add_argument("--big-gb", type=float, default=2.0, help="size of the big corpus (GB)")
    p.add_argument("--steps", type=int, default=40, help="training steps per memory run")
    p.add_argument("--prepare-mb", type=float, default=32.0, help="text to prepare (MB)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of the prepare rates")
    p.add_argument("--workers", type=int, default=0, help="prepare's workers (0: the cores)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--keep-pages", action="store_true",
                   help="memory part without releasing the mapped pages after each copy (the comparison)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child-memory", nargs=3, metavar=("CORPUS", "REPORT", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        memory_child(args.child_memory[0], args.child_memory[1], int(args.child_memory[2]), args.keep_pages)
        return
    if args.smoke:
        args.big_gb, args.steps, args.prepare_mb, args.rounds = 0.02, 4, 0.5, 1
    result: dict[str, Any] = {"meta": common.result_meta(None, 1)}
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir="/tmp") as tmp:
        if args.part in ("all", "memory"):
            result["memory"] = memory_part(args, Path(tmp))
            m = result["memory"]
            print(f"peak RSS per rank: {m['peak_rss_mib']['big']:.1f} MiB from {args.big_gb:g} GB, "
                  f"{m['peak_rss_mib']['small']:.1f} MiB from 2 MB (difference {m['peak_rss_difference_mib']:+.1f} MiB); "
                  f"data share of a step {100 * m['data_share_of_step']:.3f} %")
        if args.part in ("all", "prepare"):
            result["prepare"] = r = prepare_part(args, Path(tmp))
            print(f"prepare {r['input_mb']:.1f} MB: " + ", ".join(f"{k} {v:.2f} MB/s" for k, v in r["median_mb_per_s"].items())
                  + f"; 1 worker / encode {r['ratio_1_worker']:.2f}, {r['workers']} workers / ({r['workers']} x encode) "
                  f"{r['ratio_workers']:.2f}; per CPU second: " + ", ".join(
                      f"{k} {v:.2f} MB" for k, v in r["median_mb_per_cpu_s"].items()))
    print(f"CPU: {result['meta']['machine']['cpu']}, load average {result['meta']['machine']['load_average_1_5_15min']}")
    name = "bench_data_smoke.json" if args.smoke else f"bench_data{'_keep_pages' if args.keep_pages else ''}.json"
    print(f"wrote {common.write_json(args.out / name, result)}")


if __name__ == "__main__":
    main()
