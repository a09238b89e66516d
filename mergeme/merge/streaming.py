"""Run a merge plan: compute the next tensors on a worker thread while this thread writes.

Reading and arithmetic (torch and positional reads release the GIL for the heavy parts)
overlap with writing. At most ``prefetch`` computed tensors wait for the writer, and a trunk
method holds only chunks of its inputs, so peak memory stays near ``prefetch`` + 1 output
tensors plus the method's work buffers whatever the model size. Outputs that are byte copies
of an input (routed experts, ``base`` trunk) go file to file in the kernel, while the worker
thread computes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from tqdm import tqdm

from mergeme.io.safetensors_writer import CheckpointWriter
from mergeme.merge.plan import GROUPS, TensorJob

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH = 2
# more workers hold more finished outputs at once; past a few the disk is the limit anyway
MAX_WORKERS = 4


def default_workers() -> int:
    """One compute worker per core, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch operations on the calling thread only, while the block runs.

    The trunk methods work on cache-sized chunks, thousands of operations per tensor; with
    torch's own thread pool each operation waits for every pool thread, and on a busy machine
    a descheduled pool thread stalls them all (measured: twice the wall and CPU time). Workers
    computing different tensors use the cores instead.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress_bars(jobs: list[TensorJob]) -> dict[str, tqdm]:
    counts = Counter(job.group for job in jobs)
    return {
        group: tqdm(total=counts[group], desc=f"merge {group}", unit="tensor", position=index)
        for index, group in enumerate(g for g in GROUPS if counts[g])
    }


def run_jobs(
    jobs: list[TensorJob],
    writer: CheckpointWriter,
    prefetch: int = DEFAULT_PREFETCH,
    workers: int | None = None,
) -> None:
    """Produce and write every job's tensor.

    ``workers`` threads (default: one per core, at most ``MAX_WORKERS``) compute tensors, at
    most ``workers + prefetch`` of them ahead of the writer. Computed tensors are written in
    plan order; byte copies are done by this thread while it would otherwise wait for the next
    computed tensor (the writer takes tensors in any order), so copying the routed experts
    overlaps the trunk arithmetic instead of following it.

    Raises:
        Whatever a job's computation or the writer raises; queued work is cancelled first.
    """
    bars = _progress_bars(jobs)
    computed = iter([job for job in jobs if job.copy_from is None])
    copies = deque(job for job in jobs if job.copy_from is not None)
    pending: deque[tuple[TensorJob, Future[torch.Tensor]]] = deque()
    workers = workers or default_workers()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeme-compute")

    def submit_next() -> None:
        job = next(computed, None)
        if job is not None:
            pending.append((job, pool.submit(job.compute)))

    with single_threaded_torch():
        try:
            for _ in range(workers + prefetch):
                submit_next()
            while pending or copies:
                # copy while the next computed tensor is not ready (copy_file_range frees the GIL)
                if copies and not (pending and pending[0][1].done()):
                    job = copies.popleft()
                    writer.copy(job.spec.name, job.copy_from)
                else:
                    job, future = pending.popleft()
                    submit_next()
                    writer.write(job.spec.name, future.result())
                bars[job.group].update()
                logger.debug("wrote %s", job.spec.name)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for bar in bars.values():
                bar.close()
