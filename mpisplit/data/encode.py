"""Encoding batches of documents, in this process or in worker processes.

Each batch is encoded with the `tokenizers` library's encode_batch (no special tokens added)
and every document is followed by the eos id. A worker process loads the tokenizer once, in
its initializer; `TOKENIZERS_PARALLELISM=false` keeps each worker on one thread, so `--workers`
is the number of cores used.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.models.hf_tokenizer import HFTokenizer, load_hf_tokenizer

# Texts of one batch: enough work per task that sending it to a worker costs little.
BATCH_BYTES = 1 << 20
BATCH_DOCUMENTS = 4096

_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "MPI4PY_RC_INITIALIZE": "false"}
_worker_state: dict[str, Any] = {}  # this worker process's tokenizer and eos id (set once)


def encode_documents(tokenizer: HFTokenizer, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): the documents' ids each followed by eos, concatenated (uint32), and
    each document's length including its eos (int64)."""
    ids = [enc.ids for enc in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]
    for doc in ids:
        doc.append(eos_id)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return tokens, lengths


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker(folder: str, eos_id: int) -> None:
    _worker_state["tokenizer"] = load_hf_tokenizer(folder)
    _worker_state["eos_id"] = eos_id


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_worker_state["tokenizer"], texts, _worker_state["eos_id"])


def _start_method() -> str:
    """fork where there is one: a worker starts in milliseconds and needs no `__main__` guard in
    the calling script. The workers never call MPI or a tokenizer thread pool the parent started
    (the parent encodes nothing itself when there are workers), and leave through os._exit."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def text_batches(documents: Iterable[Any]) -> Iterator[tuple[list[str], int]]:
    """(texts, disk bytes) of consecutive documents, about BATCH_BYTES of text each."""
    texts: list[str] = []
    size = disk = 0
    for doc in documents:
        texts.append(doc.text)
        size += len(doc.text)
        disk += doc.disk_bytes
        if size >= BATCH_BYTES or len(texts) >= BATCH_DOCUMENTS:
            yield texts, disk
            texts, size, disk = [], 0, 0
    if texts:
        yield texts, disk


def encoded_batches(
    batches: Iterable[tuple[list[str], int]], tokenizer: HFTokenizer, folder: Path, eos_id: int, workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(tokens, lengths, disk bytes) per batch, in input order. With workers > 1 at most
    2 x workers batches are in flight, so memory stays bounded whatever the corpus size."""
    if workers <= 1:
        for texts, disk in batches:
            yield (*encode_documents(tokenizer, texts, eos_id), disk)
        return
    for result, disk in ordered_pool_map(batches, _encode_in_worker, _init_worker, (str(folder), eos_id), workers):
        yield (*result, disk)


def ordered_pool_map(items: Iterable[tuple[Any, int]], work: Callable[[Any], Any], init: Callable[..., None],
                     initargs: tuple, workers: int) -> Iterator[tuple[Any, int]]:
    """(work(item), disk) for each (item, disk), in order, computed by `workers` processes each
    set up once by init(*initargs); at most 2 x workers items in flight. `work` and `init` are
    module-level functions (a spawned worker imports them)."""
    # Inherited by the workers: one tokenizer thread each, and (spawned) no MPI_Init when they
    # import the package (under mpiexec a worker would otherwise try to join the parent's job).
    previous = {name: os.environ.get(name) for name in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        context = multiprocessing.get_context(_start_method())
        with context.Pool(workers, initializer=init, initargs=initargs) as pool:
            in_flight: deque = deque()
            for item, disk in items:
                in_flight.append((pool.apply_async(work, (item,)), disk))
                if len(in_flight) >= 2 * workers:
                    result, disk_done = in_flight.popleft()
                    yield result.get(), disk_done
            while in_flight:
                result, disk_done = in_flight.popleft()
                yield result.get(), disk_done
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
