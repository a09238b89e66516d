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
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from mergeme.io.safetensors_writer import CheckpointWriter
from mergeme.merge.plan import GROUPS, TensorJob

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH = 2


def _progress_bars(jobs: list[TensorJob]) -> dict[str, tqdm]:
    counts = Counter(job.group for job in jobs)
    return {
        group: tqdm(total=counts[group], desc=f"merge {group}", unit="tensor", position=index)
        for index, group in enumerate(g for g in GROUPS if counts[g])
    }


def run_jobs(
    jobs: list[TensorJob], writer: CheckpointWriter, prefetch: int = DEFAULT_PREFETCH
) -> None:
    """Produce and write every job's tensor.

    Computed tensors are written in plan order; byte copies are done by this thread while it
    would otherwise wait for the next computed tensor (the writer takes tensors in any order),
    so copying the routed experts overlaps the trunk arithmetic instead of following it.

    Raises:
        Whatever a job's computation or the writer raises; queued work is cancelled first.
    """
    bars = _progress_bars(jobs)
    computed = iter([job for job in jobs if job.copy_from is None])
    copies = deque(job for job in jobs if job.copy_from is not None)
    pending: deque[tuple[TensorJob, Future[torch.Tensor]]] = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeme-compute")

    def submit_next() -> None:
        job = next(computed, None)
        if job is not None:
            pending.append((job, pool.submit(job.compute)))

    try:
        for _ in range(prefetch):
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
