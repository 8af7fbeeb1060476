"""Train a character-level GPT split over MPI ranks.

    mpirun -n 4 python train.py                  # tp=4 on CPython's documentation text
    mpirun -n 4 python train.py --tp 2 --dp 2    # 2-way data x 2-way tensor parallel
    mpirun -n 2 python train.py --data input.txt --steps 2000 --out runs/shakespeare
    mpirun -n 4 python train.py --out runs/x --resume   # continue from runs/x/latest

Rank 0 shows progress, prints train/validation loss against the corpus's unigram
entropy, and writes DIR/metrics.jsonl (one JSON object per logged step), sharded
checkpoints DIR/step-XXXXXXXX/ and DIR/sample.txt. `python train.py --help` lists
every flag.

Failures never hang the job: an uncaught exception on any rank aborts all of them;
SIGTERM, SIGINT or SIGUSR1 (on any rank) saves a checkpoint at the next step and exits 0;
a non-finite loss or gradient norm stops every rank (exit 3) without saving; a rank that
waits in a collective longer than --collective-timeout names the missing ranks and
aborts; ranks that disagree on configuration, code or data stop before training (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

_STOP_SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a character-level GPT with tensor (layer-split) and data parallelism over MPI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    g.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: world size / tp)")
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where slabs live")
    g.add_argument("--comm", choices=["auto", "mpi", "staged", "nccl"], default="auto",
                   help="how collectives move GPU buffers: CUDA-aware MPI, pinned host staging or NCCL "
                   "(auto: nccl, else CUDA-aware MPI when the library reports it, else staged)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=4, help="transformer blocks")
    g.add_argument("--hidden", type=int, default=128, help="hidden size (multiple of --heads)")
    g.add_argument("--heads", type=int, default=4, help="attention heads (--tp must divide it)")
    g.add_argument("--seq-len", type=int, default=64, help="context length in characters")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability while training")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    g.add_argument("--amp", choices=["float16", "bfloat16"], default=None,
                   help="mixed precision: compute in this dtype with float32 master weights and dynamic "
                   "loss scaling (bfloat16 needs --device gpu)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=600, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=16, help="global batch (sequences per step, over all DP ranks)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", type=str, default=None, help="UTF-8 text file (default: CPython's documentation text); "
                   "with --init-from: token ids (.npy, or integers separated by spaces or commas)")
    g.add_argument("--init-from", type=str, default=None, metavar="FOLDER",
                   help="fine-tune GPT-2 weights from a Hugging Face folder (config.json + model.safetensors); "
                   "--layers/--hidden/--heads are taken from it")
    g.add_argument("--out", type=str, default="out", help="run folder: metrics, checkpoints, sample")
    g.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations")
    g.add_argument("--eval-iters", type=int, default=8, help="validation batches per evaluation")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--sample-len", type=int, default=300, help="characters generated at the end (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group(
        "failure handling",
        "SIGTERM, SIGINT or SIGUSR1 on any rank: save at the next step, exit 0 (continue with --resume). "
        "Testing aid: the environment variable MPISPLIT_FAULT injects faults, e.g. 'raise@rank=1,step=3', "
        "'hang@rank=1,step=3', 'nan@step=4', 'kill@rank=1,step=5' (see mpisplit/faults.py).",
    )
    g.add_argument(
        "--save-every-minutes", type=float, default=0.0,
        help="also save when this many minutes passed since the last save (rank 0's clock; 0: off)",
    )
    g.add_argument(
        "--collective-timeout", type=float, default=600.0,
        help="seconds a rank may wait in MPI without progress before it names the missing ranks "
        "and aborts the job (0: off); must exceed the longest step, evaluation or save",
    )
    return p.parse_args(argv)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """ValueError naming the values; identical on every rank, so every rank raises it."""
    for name in ("layers", "hidden", "heads", "seq_len", "steps", "batch_size", "eval_iters", "log_every", "keep_last"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eval_every", "save_every", "sample_len", "warmup", "save_every_minutes", "collective_timeout"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    tp = world_size if args.tp is None else args.tp
    if tp <= 0 or world_size % tp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"--tp {tp} does not divide the world size {world_size}; tp values that work: {divisors}")
    dp = world_size // tp if args.dp is None else args.dp
    if dp * tp != world_size:
        raise ValueError(f"--dp {dp} x --tp {tp} = {dp * tp} does not match the world size {world_size}")
    if args.batch_size % dp:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by dp={dp}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % tp:
        works = [d for d in range(1, args.heads + 1) if args.heads % d == 0 and world_size % d == 0]
        raise ValueError(f"--heads {args.heads} cannot be split over tp={tp}; tp values that work: {works}")
    if args.comm != "auto" and args.device != "gpu":
        raise ValueError(f"--comm {args.comm} applies to --device gpu (CPU arrays always go to MPI directly)")
    if args.amp is not None and args.dtype != "float32":
        raise ValueError(f"--amp keeps float32 master weights: use it with --dtype float32, not {args.dtype}")
    if args.amp == "bfloat16" and args.device != "gpu":
        raise ValueError("--amp bfloat16 needs --device gpu: NumPy has no bfloat16 arithmetic (use --amp float16)")
    if args.lr < 0 or not 0 <= args.dropout < 1:
        raise ValueError(f"need --lr >= 0 and 0 <= --dropout < 1, got {args.lr} and {args.dropout}")
    args.tp, args.dp = tp, dp


def main(argv: list[str] | None = None) -> int:
    # A stop signal during start-up (imports can take minutes on a busy shared filesystem) is
    # remembered instead of killing the rank; the guard takes it over.
    early: list[int] = []
    original = {s: signal.signal(s, lambda n, f: early.append(n)) for s in _STOP_SIGNALS}
    try:
        args = parse_args(argv)
        from mpi4py import MPI

        from mpisplit.errors import install_abort_on_exception
        from mpisplit.faults import JobGuard

        world = MPI.COMM_WORLD
        install_abort_on_exception(world)  # an unexpected exception on one rank must not hang the others
        # From here on SIGTERM/SIGINT/SIGUSR1 only set a flag, acted upon at a step boundary.
        guard = JobGuard(
            world, save_every_seconds=60 * args.save_every_minutes, pending_signal=early[0] if early else 0,
        )
        try:
            return _train(args, world, guard)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            # Raised on every rank (validated collectively): __main__ prints one line. Raised on
            # this rank alone: the others wait in a collective, so print the traceback and abort.
            if not guard.failed_everywhere():
                sys.excepthook(type(exc), exc, exc.__traceback__)
            raise
        finally:
            guard.close()
    finally:
        for s, handler in original.items():
            signal.signal(s, handler)


def _train(args: argparse.Namespace, world, guard) -> int:
    import mpisplit as ms
    from mpisplit.checkpoint import latest_checkpoint
    from mpisplit.data import (
        TextDataset,
        default_corpus,
        load_text,
        load_token_ids,
        unigram_entropy,
    )
    from mpisplit.errors import agree
    from mpisplit.faults import (
        EXIT_NONFINITE,
        FaultInjector,
        check_consistent,
        code_digests,
        text_digest,
    )
    from mpisplit.models.hf_gpt2 import read_config as load_hf_config
    from mpisplit.state import load_model, load_optimizer, resolve_checkpoint, save_training_state

    rank = world.Get_rank()

    def say(*msg: object) -> None:
        if rank == 0:
            print(*msg, flush=True)

    # ---- the same configuration and code on every rank, before anything depends on them
    check_consistent(
        world, configuration={f"--{k.replace('_', '-')}": v for k, v in sorted(vars(args).items())},
        code=code_digests([Path(__file__)]),
    )
    # ---- configuration and data: validated identically on every rank
    with agree(world):
        validate_args(args, world.Get_size())
        if args.init_from is not None:
            if args.data is None:
                raise ValueError(
                    "--init-from needs --data with token ids (.npy, or integers separated by spaces or commas): "
                    "no GPT-2 tokenizer ships offline with a well-kept package"
                )
            hf_config = load_hf_config(args.init_from)
            ids = load_token_ids(args.data, hf_config.vocab_size)
            text = ids.tobytes().decode("latin-1")  # for the consistency hash only
            data = TextDataset.from_ids(ids, hf_config.vocab_size)
        else:
            text = default_corpus() if args.data is None else load_text(args.data)
            data = TextDataset(text)
        data.check_seq_len(args.seq_len)
        out = Path(args.out)
        ckpt_path = resolve_checkpoint(out) if args.resume else None
        faults = FaultInjector.from_env(rank)  # MPISPLIT_FAULT: a testing aid, inactive when unset
    check_consistent(world, data={"sha256": text_digest(text)})
    threads = ms.limit_blas_threads(world)
    grid = ms.ProcessGrid(tp=args.tp, dp=args.dp)
    if args.device == "gpu":
        from mpisplit.device import use_gpu

        say(use_gpu(grid, comm=args.comm).summary())

    resume_meta = None
    reader = None
    if ckpt_path is not None:
        from mpisplit.checkpoint import CheckpointReader

        reader = CheckpointReader(ckpt_path, grid.world)
        resume_meta = reader.meta
        with agree(world):
            if resume_meta.get("tokenizer") != (data.tokenizer.chars if data.tokenizer else None):
                raise ValueError(f"checkpoint {ckpt_path} was trained on another alphabet (another --data?)")
            if args.steps < int(resume_meta["step"]):
                raise ValueError(
                    f"--steps {args.steps} is below the checkpoint's step {resume_meta['step']} ({ckpt_path}); "
                    f"pass --steps > {resume_meta['step']} to continue"
                )
        cfg = ms.GPTConfig(**resume_meta["config"])
    elif args.init_from is not None:
        cfg = hf_config
        cfg.dropout = args.dropout
    else:
        cfg = ms.GPTConfig(
            vocab_size=data.vocab_size, block_size=args.seq_len, n_layer=args.layers,
            n_head=args.heads, n_embd=args.hidden, dropout=args.dropout,
        )
    with agree(world):
        cfg.validate(grid.tp)
        if args.seq_len > cfg.block_size:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the checkpoint's block_size {cfg.block_size}")
    if args.init_from is not None and reader is None:
        model = ms.GPT.from_pretrained(args.init_from, grid, dtype=args.dtype).to(args.device)
        model.set_dropout(args.dropout)
    else:
        model = ms.GPT(cfg, grid, dtype=args.dtype, seed=args.seed, init=reader is None, device=args.device)
    if args.optimizer == "adamw":
        opt = ms.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    else:
        opt = ms.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start_step = 0
    if reader is not None:
        load_model(reader, model)
        with agree(world):
            saved_opt = resume_meta.get("optimizer", {}).get("type")
            if saved_opt != type(opt).__name__:
                raise ValueError(f"checkpoint optimizer {saved_opt} differs from --optimizer {args.optimizer}")
        load_optimizer(reader, model, opt)
        start_step = int(resume_meta["step"])
        _restore_rng(model, reader, grid)
        reader.close()
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    # With --amp, `net` (16-bit) runs forward and backward; `model` keeps the float32 master
    # weights that the optimizer steps and checkpoints save. They share the dropout streams.
    net, mp = model, None
    if args.amp is not None:
        from mpisplit.amp import MixedPrecision

        net = ms.GPT(cfg, grid, dtype="float32", init=False, device=args.device)
        net.rng_shared, net.rng_local = model.rng_shared, model.rng_local
        with agree(world):
            mp = MixedPrecision(net, model, args.amp, grid.world)
            if resume_meta is not None and resume_meta.get("loss_scaler"):
                mp.scaler.load_state_dict(resume_meta["loss_scaler"])  # continue with the saved scale

    entropy = unigram_entropy(data.train, data.vocab_size)
    say(
        f"mpisplit {ms.__version__}: world {world.Get_size()} = dp {grid.dp} x tp {grid.tp}, "
        f"{threads} BLAS thread(s) per rank, {args.dtype}"
        f"{f' master weights, {args.amp} compute' if args.amp else ''}, device {args.device}"
    )
    say(
        f"data: {'CPython documentation text' if args.data is None else args.data}, "
        f"{len(data.train):,} train / {len(data.val):,} val tokens, vocabulary {data.vocab_size}"
    )
    say(
        f"model: {cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.n_head} heads, context {args.seq_len}, "
        f"{model.num_parameters():,} parameters"
    )
    unit = "character" if data.tokenizer is not None else "token"
    say(f"unigram entropy of the training {unit}s: {entropy:.4f} nats (the loss of a context-free model)")
    if start_step:
        say(f"resumed from {ckpt_path} at step {start_step}")

    base_meta = {
        "config": cfg.to_dict(), "tokenizer": data.tokenizer.chars if data.tokenizer else None, "args": vars(args),
        "data": {"seed": args.seed, "sampler": "random-windows-v1", "source": args.data or "pydoc_data.topics"},
        "dtype": args.dtype,
    }
    out.mkdir(parents=True, exist_ok=True) if rank == 0 else None
    world.Barrier()
    if rank == 0 and start_step:
        _truncate_metrics(out / "metrics.jsonl", start_step)  # lines a crash left past the checkpoint
    metrics = open(out / "metrics.jsonl", "a" if start_step else "w") if rank == 0 else None  # noqa: SIM115

    def evaluate() -> float:
        net.eval()
        losses = []
        with ms.no_grad():
            for i in range(args.eval_iters):
                x, y = data.batch("val", args.seed, i, args.batch_size, args.seq_len, grid.dp_rank, grid.dp)
                losses.append(float(ms.to_numpy(net.loss(x, y).data)))
        net.train()
        local = np.array([np.mean(losses)])
        return float(grid.dp_comm.allreduce(local)[0] / grid.dp)

    def save(step: int) -> Path:
        guard.beat(step)  # the watchdog measures the save on its own
        path = save_training_state(
            out, step, model, opt, grid,
            meta={**base_meta, "step": step, **({"loss_scaler": mp.scaler.state_dict()} if mp else {})},
            rank_meta=_rng_state(model),
            keep_last=args.keep_last,
        )
        guard.saved()
        guard.beat(step)
        return path

    def finish() -> None:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    guard.start_watchdog(out / ".heartbeat", args.collective_timeout, step=start_step)
    net.train()
    val_loss = None
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start_step, args.steps):
        done = step + 1
        faults.before_step(done)
        opt.lr = ms.optim.cosine_lr(step, max_lr=args.lr, warmup=args.warmup, total=args.steps, min_lr=min_lr)
        x, y = data.batch("train", args.seed, step, args.batch_size, args.seq_len, grid.dp_rank, grid.dp)
        loss = net.loss(x, y)
        if mp is None:
            loss.backward()
        else:
            mp.backward(loss)  # d(scale * loss)
        faults.poison_grads(done, net.parameters())
        # Mixed precision: a gradient overflow on any rank skips the step on every rank.
        skipped = mp is not None and not mp.unscale_()
        norm = float("nan")
        if not skipped:
            ms.optim.average_gradients(model.parameters(), grid.dp_comm)
            norm = ms.optim.clip_grad_norm(model.parameters(), args.grad_clip, grid.tp_comm)
        loss_value = float(ms.to_numpy(loss.data))
        if grid.dp > 1:
            loss_value = float(grid.dp_comm.allreduce(np.array([loss_value]))[0] / grid.dp)
        loss_value = faults.poison_loss(done, loss_value)
        # Every rank learns the same: a signal anywhere, a non-finite value anywhere, save time.
        decision = guard.agree(done, finite=math.isfinite(loss_value) and (skipped or math.isfinite(norm)))
        if decision.nonfinite:
            finish()
            last = latest_checkpoint(out)
            print(
                f"[rank {rank}] error: non-finite loss or gradient norm at step {done} (here: loss {loss_value}, "
                f"gradient norm {norm}); stopped without taking the step or saving. Last good checkpoint: "
                f"{last if last is not None else 'none'}" + (" (continue with --resume)" if last else ""),
                file=sys.stderr, flush=True,
            )
            grid.free()
            return EXIT_NONFINITE
        if not skipped:
            opt.step()
            if mp is not None:
                mp.update_model()
        if mp is not None:
            mp.update_scale(skipped)
            mp.zero_grad()
        opt.zero_grad()
        tokens_seen += args.batch_size * args.seq_len
        # The last step is always evaluated, so metrics.jsonl ends with a validation loss.
        evaluated = done == args.steps or bool(args.eval_every and done % args.eval_every == 0)
        if evaluated:
            val_loss = evaluate()
            guard.beat(done)
        if rank == 0:
            record = {"step": done, "loss": loss_value, "lr": opt.lr, "grad_norm": norm}
            if mp is not None:
                record.update(loss_scale=mp.scale, skipped=skipped, grad_norm=None if skipped else norm)
            if evaluated:
                record["val_loss"] = val_loss
            if done % args.log_every == 0 or evaluated or done == args.steps or decision.stop:
                record["tokens_per_s"] = tokens_seen / (time.perf_counter() - t0)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.3f}", **({"val": f"{val_loss:.3f}"} if val_loss else {}))
                progress.update(1)
            elif evaluated:
                print(f"step {done}: train loss {loss_value:.4f}, val loss {val_loss:.4f}", flush=True)
        if evaluated and progress is not None:
            progress.write(f"step {done}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
        periodic = args.save_every and done % args.save_every == 0
        if done != args.steps and (periodic or decision.save_due or decision.stop):
            path = save(done)
        if decision.stop and done != args.steps:
            finish()
            say(f"{decision.signal_name}: stopped after step {done}, saved {path}; continue with --resume")
            grid.free()
            return 0
    if progress is not None:
        progress.close()

    elapsed = time.perf_counter() - t0
    if val_loss is None:
        val_loss = evaluate()
    path = save(args.steps)
    say(f"saved checkpoint {path}")
    say(
        f"final: validation loss {val_loss:.4f} nats vs unigram entropy {entropy:.4f} nats "
        f"({val_loss / math.log(2):.3f} vs {entropy / math.log(2):.3f} bits per {unit}); "
        f"{tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s"
    )
    if args.sample_len and not guard.signum:  # a stop request skips the sample
        tok = data.tokenizer
        prompt = tok.encode("\n")[None, :] if tok is not None and "\n" in tok.index else data.val[None, :1]
        ids = model.generate(prompt, args.sample_len, temperature=0.8, top_k=20, seed=args.seed)
        sample = tok.decode(ids[0]) if tok is not None else " ".join(str(int(i)) for i in ids[0])
        if rank == 0:
            (out / "sample.txt").write_text(sample, encoding="utf-8")
            print(f"sample (temperature 0.8, top-k 20) -> {out / 'sample.txt'}:\n{sample}", flush=True)
    if metrics is not None:
        metrics.close()
    grid.free()
    return 0


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines of steps <= step (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        kept.append(line)
    if len(kept) != len(lines):
        path.write_text("".join(kept), encoding="utf-8")


def _rng_state(model) -> dict:
    return {"shared": model.rng_shared.bit_generator.state, "local": model.rng_local.bit_generator.state}


def _restore_rng(model, reader, grid) -> None:
    """Dropout streams continue exactly when the layout is unchanged; otherwise they are reseeded."""
    if reader.tp == grid.tp and reader.dp == grid.dp:
        state = reader.rank_meta(grid.rank)
        if state:
            model.rng_shared.bit_generator.state = state["shared"]
            model.rng_local.bit_generator.state = state["local"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Raised on every rank alike (validated collectively): one clear line, no traceback wall.
        # Ranks that disagree all say so: each one's log may be read alone.
        from mpi4py import MPI

        from mpisplit.faults import ConsistencyError

        rank = MPI.COMM_WORLD.Get_rank()
        if isinstance(exc, ConsistencyError):
            print(f"[rank {rank}] error: {exc}", file=sys.stderr, flush=True)
        elif rank == 0:
            print(f"error: {getattr(exc, 'plain', None) or exc}", file=sys.stderr, flush=True)
        sys.exit(2)
