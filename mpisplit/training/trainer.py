"""The training loop: `train(config)` on every rank of a job, or `Trainer(config).run()`.

One step: the batch of this DP rank -> M micro-batches, each forward (split over TP) and backward
(with loss scaling under amp), in the 1F1B pipeline schedule when pp > 1 (training/step.py) ->
DP gradient average and global-norm clip -> one agreement with every rank (stop
signal, non-finite values, save time) -> optimizer step -> metrics, evaluation, checkpoints.

Failures never hang the job: a stop signal on any rank saves at the step boundary and returns
0; a non-finite loss or gradient norm returns EXIT_NONFINITE (3) on every rank without saving;
the watchdog aborts a rank stuck in a collective (see mpisplit.runtime.faults).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisplit import __version__
from mpisplit.autograd import no_grad
from mpisplit.models.peft_adapter import export_checkpoint_adapter
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.parallel.placement import warn_split_tp_groups
from mpisplit.runtime.backend import limit_blas_threads
from mpisplit.runtime.errors import agree
from mpisplit.runtime.faults import (
    EXIT_NONFINITE,
    FaultInjector,
    JobGuard,
    check_consistent,
    code_digests,
    text_digest,
)
from mpisplit.training import optim
from mpisplit.training.checkpoint import latest_checkpoint
from mpisplit.training.config import TrainConfig
from mpisplit.training.overlap import overlapped_reduction
from mpisplit.training.plot import plot_run
from mpisplit.training.run_log import RunLog
from mpisplit.training.setup import build_model, load_data, open_checkpoint, rng_state
from mpisplit.training.sharded_optim import ShardedAdamW
from mpisplit.training.state import resolve_checkpoint, save_training_state
from mpisplit.training.step import StepRunner


@dataclass
class TrainResult:
    exit_code: int  # 0: finished or stopped on a signal (and saved); EXIT_NONFINITE: halted
    step: int  # the last step taken
    val_loss: float | None  # the last validation loss
    checkpoint: Path | None  # the checkpoint saved last
    history: list[dict] = field(default_factory=list)  # what metrics.jsonl received (on every rank)


def train(config: TrainConfig, comm: Any = None, *, code_files: Iterable[str | Path] = ()) -> TrainResult:
    """Run `config` on `comm` (default COMM_WORLD); collective. Creates the job's JobGuard
    (stop-signal handlers, watchdog) for the duration of the run. `code_files`: scripts whose
    contents every rank must share besides the package (the launching script)."""
    world = MPI.COMM_WORLD if comm is None else comm
    guard = JobGuard(world, save_every_seconds=60 * config.save_every_minutes)
    try:
        return Trainer(config, world, guard, code_files=code_files).run()
    finally:
        guard.close()


class Trainer:
    """One run of `config` over `world`; `guard` owns the signals and the step agreement."""

    def __init__(self, config: TrainConfig, world: Any, guard: JobGuard, *, code_files: Iterable[str | Path] = ()) -> None:
        self.config, self.world, self.guard = config, world, guard
        self.rank = world.Get_rank()
        check_consistent(world, configuration=config.flags(), code=code_digests(list(code_files)))
        with agree(world):  # configuration and data: validated identically on every rank
            tp, dp = config.validate(world.Get_size())
            data = load_data(config, self.rank, world.Get_size())
            self.out = Path(config.out)
            resume_from = resolve_checkpoint(self.out) if config.resume else None
            self.faults = FaultInjector.from_env(self.rank)  # MPISPLIT_FAULT: a testing aid, inactive when unset
            _make_run_folder(self.out, create=self.rank == 0)
        check_consistent(world, data={"sha256": text_digest(data.text)})
        self.data = data.dataset
        self.threads = limit_blas_threads(world)
        self.grid = grid = ProcessGrid(tp=tp, dp=dp, pp=config.pp, comm=world)
        warn_split_tp_groups(world, tp)
        self.gpu = None
        if config.device == "gpu":
            from mpisplit.parallel.gpu import use_gpu

            self.gpu = use_gpu(grid, comm=config.comm)
        reader = open_checkpoint(resume_from, config, self.data, grid)
        self.resumed_from = resume_from
        m = build_model(config, data, reader, grid)
        self.cfg, self.model, self.net, self.opt, self.mp, self.step = m.config, m.model, m.net, m.opt, m.mp, m.start_step
        self.lora = m.lora
        self.runner = StepRunner(self.net, grid, config.micro_batches)
        with agree(world):
            self.overlap = overlapped_reduction(config.overlap_grads, self.model, self.opt, self.mp, grid)
        self.min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
        self.val_loss: float | None = None
        self.history: list[dict] = []
        self.last_saved: Path | None = None
        tok = self.data.tokenizer
        self.base_meta = {
            "config": self.cfg.to_dict(), "tokenizer": tok.chars if tok else None, "args": config.to_dict(),
            "data": {"seed": config.seed, "sampler": "random-windows-v1", "source": config.data or "pydoc_data.topics"},
            "dtype": config.dtype, "lora": None if self.lora is None else self.lora.to_meta(),
        }

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        c = self.config
        self.log = RunLog(self.rank, self.out, start_step=self.step, total=c.steps, progress=c.progress)
        try:
            self._announce()
            self.guard.start_watchdog(self.out / ".heartbeat", c.collective_timeout, step=self.step)
            code = self._loop()
            if code is None:
                code = self._finish()
        finally:
            self.log.close()
            if self.overlap is not None:
                self.overlap.close()
        self.grid.free()  # collective: not on the way out of an exception one rank alone may have
        return TrainResult(code, self.step, self.val_loss, self.last_saved, self.history)

    def _loop(self) -> int | None:
        """Steps until the end (None) or an early exit code."""
        c = self.config
        self.net.train()
        self.t0, self.tokens_seen = time.perf_counter(), 0
        while self.step < c.steps:
            done = self.step + 1
            loss, norm, skipped, decision = self.train_step(done)
            if decision.nonfinite:
                self._report_nonfinite(done, loss, norm)
                return EXIT_NONFINITE
            self.step = done
            self.tokens_seen += c.batch_size * c.seq_len
            # The last step is always evaluated, so metrics.jsonl ends with a validation loss.
            evaluated = done == c.steps or bool(c.eval_every and done % c.eval_every == 0)
            if evaluated:
                self.val_loss = self.evaluate()
                self.guard.beat(done)
            self._record(done, loss, norm, skipped, evaluated, decision.stop)
            periodic = c.save_every and done % c.save_every == 0
            if done != c.steps and (periodic or decision.save_due or decision.stop):
                self.save(done)
            if decision.stop and done != c.steps:
                self.log.close_progress()
                self.log.say(f"{decision.signal_name}: stopped after step {done}, saved {self.last_saved}; "
                             "continue with --resume")
                return 0
        self.log.close_progress()
        return None

    def train_step(self, done: int) -> tuple[float, float, bool, Any]:
        """Forward, backward, gradient reduction, the agreement and (unless halted) the update of
        step `done`; returns (loss averaged over DP, gradient norm, skipped by amp, decision)."""
        c, grid, mp = self.config, self.grid, self.mp
        self.faults.before_step(done)
        self.opt.lr = optim.cosine_lr(done - 1, max_lr=c.lr, warmup=c.warmup, total=c.steps, min_lr=self.min_lr)
        x, y, positions = self.data.rows("train", c.seed, done - 1, c.batch_size, c.seq_len, grid.dp_rank, grid.dp)
        if self.overlap is not None:
            self.overlap.start(self.runner.micro_batches)
        # d(mean loss) over M micro-batches; under amp d(scale * loss)
        value = self.runner.forward_backward(x, y, loss_scale=1.0 if mp is None else mp.scale,
                                             target_count=self._target_count(y), positions=positions)
        self.faults.poison_grads(done, self.net.parameters())
        skipped = mp is not None and not mp.unscale_()  # an overflow on any rank skips the step on every rank
        norm = float("nan")
        if not skipped:
            norm = self._reduce_and_clip()
        if grid.dp > 1:
            value = float(grid.dp_comm.allreduce(np.array([value]))[0] / grid.dp)
        value = self.faults.poison_loss(done, value)
        # Every rank learns the same: a signal anywhere, a non-finite value anywhere, save time.
        decision = self.guard.agree(done, finite=math.isfinite(value) and (skipped or math.isfinite(norm)))
        if decision.nonfinite:
            return value, norm, skipped, decision
        if not skipped:
            self.opt.step()
            if mp is not None:
                mp.update_model()
        if mp is not None:
            mp.update_scale(skipped)
            mp.zero_grad()
        self.opt.zero_grad()
        return value, norm, skipped, decision

    def _target_count(self, y: Any) -> int | None:
        """Masked data: the targets that count in this step, over every DP rank (one small
        all-reduce); None otherwise (every target counts, and each rank knows how many)."""
        if not self.data.masked:
            return None
        local = np.array([int((y != -100).sum())], dtype=np.int64)
        return int(self.grid.dp_comm.allreduce(local)[0])

    def _reduce_and_clip(self) -> float:
        """DP average of the gradients and the global-norm clip; returns the norm. A sharded
        optimizer reduce-scatters the block and clips its part; otherwise one all-reduce."""
        grid, clip = self.grid, self.config.grad_clip
        if self.overlap is not None:
            self.overlap.finish()  # already under way since backward began
        if isinstance(self.opt, ShardedAdamW):
            if self.overlap is None:
                self.opt.reduce_scatter_gradients()
            return self.opt.clip_grad_norm(clip, grid.tp_comm, grid.pp_comm)
        if self.overlap is None:
            optim.average_gradients(self.model.parameters(), grid.dp_comm)
        return optim.clip_grad_norm(self.model.parameters(), clip, grid.tp_comm, grid.pp_comm)

    def evaluate(self) -> float:
        """Mean validation loss over eval_iters batches and every DP rank (masked data: the
        summed cross-entropy over the counted targets of them all)."""
        c, grid = self.config, self.grid
        self.net.eval()
        losses, counted = [], 0
        with no_grad():
            for i in range(c.eval_iters):
                x, y, positions = self.data.rows("val", c.seed, i, c.batch_size, c.seq_len, grid.dp_rank, grid.dp)
                losses.append(self.runner.evaluate(x, y, summed=self.data.masked, positions=positions))
                counted += int((y != -100).sum())
        self.net.train()
        if self.data.masked:
            total = grid.dp_comm.allreduce(np.array([sum(losses), counted], dtype=np.float64))
            return float(total[0] / max(total[1], 1.0))
        return float(grid.dp_comm.allreduce(np.array([np.mean(losses)]))[0] / grid.dp)

    def save(self, step: int) -> Path:
        self.guard.beat(step)  # the watchdog measures the save on its own
        scaler = {"loss_scaler": self.mp.scaler.state_dict()} if self.mp else {}
        self.last_saved = save_training_state(
            self.out, step, self.model, self.opt, self.grid, meta={**self.base_meta, "step": step, **scaler},
            rank_meta=rng_state(self.model), keep_last=self.config.keep_last,
        )
        if self.lora is not None:  # the adapters also in PEFT's format: step-N/adapter
            with agree(self.world):
                if self.rank == 0:
                    export_checkpoint_adapter(self.last_saved, self.lora, self.config.init_from)
        self.guard.saved()
        self.guard.beat(step)
        return self.last_saved

    # ------------------------------------------------------------ what is shown

    def _announce(self) -> None:
        c, grid, say = self.config, self.grid, self.log.say
        if self.gpu is not None:
            say(self.gpu.summary())
        say(
            f"mpisplit {__version__}: world {self.world.Get_size()} = dp {grid.dp} x "
            f"{f'pp {grid.pp} x ' if grid.pp > 1 else ''}tp {grid.tp}, "
            f"{f'{c.micro_batches} micro-batches, ' if c.micro_batches > 1 else ''}"
            f"{'sequence parallel, ' if self.net.sequence_parallel else ''}"
            f"{self.threads} BLAS thread(s) per rank, {c.dtype}"
            f"{f' master weights, {c.amp} compute' if c.amp else ''}, device {c.device}"
            f"{', optimizer state sharded over dp' if c.shard_optimizer else ''}"
            f"{f', DP gradients reduced during backward ({len(self.overlap.order)} buckets)' if self.overlap else ''}"
        )
        say(
            f"data: {'CPython documentation text' if c.data is None else c.data}, "
            f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens, vocabulary {self.data.vocab_size}"
        )
        cfg = self.cfg
        say(
            f"model: {cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.n_head} heads, context {c.seq_len}, "
            f"{self._num_parameters():,} parameters"
        )
        self.entropy = self.data.train_entropy()
        self.unit = "character" if self.data.tokenizer is not None else "token"
        say(f"unigram entropy of the training {self.unit}s: {self.entropy:.4f} nats (the loss of a context-free model)")
        if self.step:
            say(f"resumed from {self.resumed_from} at step {self.step}")

    def _num_parameters(self) -> int:
        n = self.model.num_parameters()  # this stage's share at pp > 1
        if self.grid.pp > 1:
            n = int(self.grid.pp_comm.allreduce(np.array([n], dtype=np.int64))[0])
        return n

    def _record(self, done: int, loss: float, norm: float, skipped: bool, evaluated: bool, stop: bool) -> None:
        c = self.config
        record = {"step": done, "loss": loss, "lr": self.opt.lr, "grad_norm": norm}
        if self.mp is not None:
            record.update(loss_scale=self.mp.scale, skipped=skipped, grad_norm=None if skipped else norm)
        if evaluated:
            record["val_loss"] = self.val_loss
        if done % c.log_every == 0 or evaluated or done == c.steps or stop:
            record["tokens_per_s"] = self.tokens_seen / (time.perf_counter() - self.t0)
            self.history.append(record)
            self.log.record(record)
        self.log.step_done(loss, self.val_loss, evaluated, done)

    def _report_nonfinite(self, done: int, loss: float, norm: float) -> None:
        self.log.close()
        last = latest_checkpoint(self.out)
        print(
            f"[rank {self.rank}] error: non-finite loss or gradient norm at step {done} (here: loss {loss}, "
            f"gradient norm {norm}); stopped without taking the step or saving. Last good checkpoint: "
            f"{last if last is not None else 'none'}" + (" (continue with --resume)" if last else ""),
            file=sys.stderr, flush=True,
        )

    def _finish(self) -> int:
        c, say = self.config, self.log.say
        elapsed = time.perf_counter() - self.t0
        if self.val_loss is None:
            self.val_loss = self.evaluate()
        say(f"saved checkpoint {self.save(c.steps)}")
        val, ent = self.val_loss, self.entropy
        say(
            f"final: validation loss {val:.4f} nats vs unigram entropy {ent:.4f} nats "
            f"({val / math.log(2):.3f} vs {ent / math.log(2):.3f} bits per {self.unit}); "
            f"{self.tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s"
        )
        if c.sample_len and not self.guard.signum:  # a stop request skips the sample
            if self.grid.pp == 1:
                self._sample()
            else:
                say(f"no sample at --pp {self.grid.pp}: generate from the checkpoint (mpisplit generate --help)")
        if c.plot and self.rank == 0:
            self.log.close()  # metrics.jsonl complete before it is read
            say(plot_run(self.out, missing_ok=True).message)
        return 0

    def _sample(self) -> None:
        c, tok = self.config, self.data.tokenizer
        prompt = tok.encode("\n")[None, :] if tok is not None and "\n" in tok.index else self.data.val[:1][None, :]
        # the float32 master weights, unless a sharded optimizer holds only its part of them
        model = self.net if getattr(self.opt, "holds_master_weights", False) else self.model
        ids = model.generate(prompt, c.sample_len, temperature=0.8, top_k=20, seed=c.seed)
        sample = tok.decode(ids[0]) if tok is not None else " ".join(str(int(i)) for i in ids[0])
        if self.rank == 0:
            (self.out / "sample.txt").write_text(sample, encoding="utf-8")
            print(f"sample (temperature 0.8, top-k 20) -> {self.out / 'sample.txt'}:\n{sample}", flush=True)


def _make_run_folder(out: Path, create: bool) -> None:
    """Under agree: an existing file is the same clear error on every rank; `create` (rank 0)
    makes the folder, and a place it cannot be made is an error too."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder: pass a folder name")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the run folder ({exc.strerror or exc})") from None
