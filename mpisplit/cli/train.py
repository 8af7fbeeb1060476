"""`mpisplit train` (also `python train.py`): train a GPT split over MPI ranks.

    mpirun -n 4 mpisplit train                   # tp=4 on CPython's documentation text
    mpirun -n 4 mpisplit train --tp 2 --dp 2     # 2-way data x 2-way tensor parallel
    mpirun -n 4 mpisplit train --pp 2 --tp 2 --micro-batches 4   # 2 pipeline stages of tp=2
    mpirun -n 2 mpisplit train --data input.txt --steps 2000 --out runs/shakespeare
    mpirun -n 4 mpisplit train --data data/corpus --tokenizer tok   # a prepared corpus (mpisplit prepare)
    mpirun -n 4 mpisplit train --out runs/x --resume   # continue from runs/x/latest

Rank 0 shows progress, prints train/validation loss against the corpus's unigram entropy, and
writes DIR/metrics.jsonl, sharded checkpoints DIR/step-XXXXXXXX/, DIR/sample.txt and the loss
curve DIR/loss.png. Exit status: 0 done (or stopped on a signal, saved), 2 bad input (one
"error:" line), 3 non-finite loss, 124 collective timeout.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields
from pathlib import Path

from mpisplit.training.config import TrainConfig

_STOP_SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n)]
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
D = TrainConfig()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a GPT (character-level, or with a tokenizer's vocabulary on a prepared corpus) "
        "with tensor (layer-split), pipeline and data parallelism over MPI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=D.tp, help="tensor-parallel degree (default: world size / pp)")
    g.add_argument("--dp", type=int, default=D.dp, help="data-parallel degree (default: world size / (tp * pp))")
    g.add_argument("--pp", type=int, default=D.pp,
                   help="pipeline stages: the blocks spread over them, run in the 1F1B schedule")
    g.add_argument("--micro-batches", type=int, default=D.micro_batches,
                   help="micro-batches per step on each DP rank (the pipeline's m; gradient accumulation at --pp 1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="outside the tensor-parallel layers, split activations along the sequence "
                   "(--seq-len must be a multiple of --tp)")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default=D.recompute,
                   help="activation recomputation in backward: selective (the attention core) or full "
                   "(each block from its input); dropout masks are replayed exactly")
    g.add_argument("--device", choices=["cpu", "gpu"], default=D.device, help="where slabs live")
    g.add_argument("--comm", choices=["auto", "mpi", "staged", "nccl"], default=D.comm,
                   help="how collectives move GPU buffers: CUDA-aware MPI, pinned host staging or NCCL "
                   "(auto: nccl, else CUDA-aware MPI when the library reports it, else staged)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["gpt", "llama"], default=D.arch,
                   help="a fresh model's parts: gpt (GPT-2: LayerNorm, GELU, learned positions) or llama "
                   "(RMSNorm, SwiGLU, rotary positions, grouped-query attention)")
    g.add_argument("--layers", type=int, default=D.layers, help="transformer blocks")
    g.add_argument("--hidden", type=int, default=D.hidden, help="hidden size (multiple of --heads)")
    g.add_argument("--heads", type=int, default=D.heads, help="attention heads (--tp must divide it)")
    g.add_argument("--seq-len", type=int, default=D.seq_len, help="context length in tokens (characters for the built-in character corpus)")
    g.add_argument("--dropout", type=float, default=D.dropout, help="dropout probability while training")
    g.add_argument("--kv-heads", type=int, default=D.kv_heads,
                   help="--arch llama: key/value heads (divides --heads; tp must divide it or be a multiple of it)")
    g.add_argument("--intermediate", type=int, default=D.intermediate, help="MLP width (default: 4 * --hidden)")
    g.add_argument("--rope-theta", type=float, default=D.rope_theta, help="--arch llama: the rotary base")
    g.add_argument("--dtype", choices=["float32", "float64"], default=D.dtype)
    g.add_argument("--amp", choices=["float16", "bfloat16"], default=D.amp,
                   help="mixed precision: compute in this dtype with float32 master weights and dynamic "
                   "loss scaling (bfloat16 needs --device gpu)")
    _optimisation(p.add_argument_group("optimisation"))
    _lora(p.add_argument_group("LoRA", "adapters on the projections of a pretrained Llama-family model "
                                       "(--init-from), the base weights frozen"))
    _output(p.add_argument_group("data and output"))
    _failures(p)
    return p


def _optimisation(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--steps", type=int, default=D.steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=D.batch_size,
                   help="global batch (sequences per step, over all DP ranks)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=D.optimizer)
    g.add_argument("--shard-optimizer", action="store_true",
                   help="hold 1/dp of the AdamW moments on each DP rank (reduce-scatter, update, all-gather)")
    g.add_argument("--overlap-grads", choices=["auto", "on", "off"], default=D.overlap_grads,
                   help="reduce the DP gradients during backward, bucket by bucket (auto: when DP spans nodes)")
    g.add_argument("--lr", type=float, default=D.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=D.min_lr, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup", type=int, default=D.warmup, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay)
    g.add_argument("--momentum", type=float, default=D.momentum, help="SGD momentum")
    g.add_argument("--grad-clip", type=float, default=D.grad_clip, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=D.seed)


def _lora(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--lora-rank", type=int, default=D.lora_rank, metavar="R",
                   help="train rank-R adapters instead of the weights (0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=D.lora_alpha, metavar="A",
                   help="the adapters' scale is A / R (default: A = R)")
    g.add_argument("--lora-targets", default=D.lora_targets, metavar="NAMES",
                   help="the projections adapted, by their Hugging Face names: q_proj,k_proj,v_proj,o_proj,"
                        "gate_proj,up_proj,down_proj, or all-linear")
    g.add_argument("--lora-dropout", type=float, default=D.lora_dropout, metavar="P",
                   help="dropout on the adapters' input while training, as PEFT's lora_dropout (with "
                        "--lora-from: the adapter's lora_dropout unless this is given)")
    g.add_argument("--lora-rslora", action="store_true", help="rank-stabilised scale A / sqrt(R)")
    g.add_argument("--lora-from", default=D.lora_from, metavar="FOLDER",
                   help="start the adapters from a PEFT adapter folder (adapter_config.json + "
                        "adapter_model.safetensors; its rank, alpha and targets apply)")


def _output(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data", type=str, default=D.data, help="UTF-8 text file (default: CPython's documentation "
                   "text), a folder from `mpisplit prepare`, or with --init-from/--tokenizer: token ids (.npy, or "
                   "integers separated by spaces or commas), or text encoded by the folder's tokenizer")
    g.add_argument("--pack", action="store_true",
                   help="a chat corpus (prepare --chat): pack several conversations into each row of --seq-len "
                        "tokens; attention stays within each conversation and its positions start at 0")
    g.add_argument("--init-from", type=str, default=D.init_from, metavar="FOLDER",
                   help="fine-tune from a Hugging Face folder (config.json + model.safetensors) of GPT-2 or the "
                   "Llama family (llama, qwen2, mistral), or a GGUF file (FILE.gguf); the model's shape is taken from it")
    g.add_argument("--tokenizer", type=str, default=D.tokenizer, metavar="FOLDER",
                   help="a fresh model whose vocabulary is this tokenizer's (tokenizer.json, or vocab.json + "
                   "merges.txt); a prepared --data must have been prepared with it")
    g.add_argument("--out", type=str, default=D.out, help="run folder: metrics, checkpoints, sample, loss curve")
    g.add_argument("--eval-every", type=int, default=D.eval_every, help="steps between validation evaluations")
    g.add_argument("--eval-iters", type=int, default=D.eval_iters, help="validation batches per evaluation")
    g.add_argument("--log-every", type=int, default=D.log_every, help="steps between metrics.jsonl lines")
    g.add_argument("--save-every", type=int, default=D.save_every, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=D.keep_last, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--sample-len", type=int, default=D.sample_len, help="characters generated at the end (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no loss curve (--out/loss.png; needs matplotlib)")


def _failures(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "failure handling",
        "SIGTERM, SIGINT or SIGUSR1 on any rank: save at the next step, exit 0 (continue with --resume). "
        "Testing aid: the environment variable MPISPLIT_FAULT injects faults, e.g. 'raise@rank=1,step=3', "
        "'hang@rank=1,step=3', 'nan@step=4', 'kill@rank=1,step=5' (see mpisplit/runtime/faults/injection.py).",
    )
    g.add_argument("--save-every-minutes", type=float, default=D.save_every_minutes,
                   help="also save when this many minutes passed since the last save (rank 0's clock; 0: off)")
    g.add_argument("--collective-timeout", type=float, default=D.collective_timeout,
                   help="seconds a rank may wait in MPI without progress before it names the missing ranks "
                   "and aborts the job (0: off); must exceed the longest step, evaluation or save")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def validate_args(args: argparse.Namespace, world_size: int) -> tuple[int, int]:
    """(tp, dp), or the ValueError every rank raises alike for these flags at this world size."""
    return config_from_args(args).validate(world_size)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["progress"] = not values.pop("no_progress")
    values["plot"] = not values.pop("no_plot")
    names = {f.name for f in fields(TrainConfig)}
    assert set(values) == names, set(values) ^ names  # every flag is a field and back
    return TrainConfig(**values)


def main(argv: list[str] | None = None, prog: str | None = None, script: str | None = None) -> int:
    """Parse, run on COMM_WORLD, return the exit status. `script`: the launching file, whose
    contents every rank must share."""
    # A stop signal during start-up (imports can take minutes on a busy shared filesystem) is
    # remembered instead of killing the rank; the guard takes it over.
    early: list[int] = []
    original = {s: signal.signal(s, lambda n, f: early.append(n)) for s in _STOP_SIGNALS}
    try:
        config = config_from_args(parse_args(argv, prog))
        from mpi4py import MPI

        from mpisplit.runtime.errors import install_abort_on_exception
        from mpisplit.runtime.faults import JobGuard
        from mpisplit.training.trainer import Trainer

        world = MPI.COMM_WORLD
        install_abort_on_exception(world)  # an unexpected exception on one rank must not hang the others
        # From here on SIGTERM/SIGINT/SIGUSR1 only set a flag, acted upon at a step boundary.
        guard = JobGuard(world, save_every_seconds=60 * config.save_every_minutes,
                         pending_signal=early[0] if early else 0)
        try:
            code_files = [Path(script)] if script else []
            return Trainer(config, world, guard, code_files=code_files).run().exit_code
        except USER_ERRORS as exc:
            # Raised on every rank (validated collectively): the caller prints one line. Raised on
            # this rank alone: the others wait in a collective, so print the traceback and abort.
            if not guard.failed_everywhere():
                sys.excepthook(type(exc), exc, exc.__traceback__)
            raise
        finally:
            guard.close()
    finally:
        for s, handler in original.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    from mpisplit.runtime.errors import run_cli

    run_cli(main, USER_ERRORS)
