"""Run a merge plan: compute the next tensors on a worker thread while this thread writes.

Reading and arithmetic (torch and safetensors release the GIL for the heavy parts) overlap
with writing. At most ``prefetch`` computed tensors wait for the writer, so peak memory stays
near (inputs of one tensor + ``prefetch`` + 1) tensors whatever the model size. Outputs that
are byte copies of an input (routed experts, ``base`` trunk) go file to file in the kernel.
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
    """Produce and write every job's tensor, in order.

    Raises:
        Whatever a job's computation or the writer raises; queued work is cancelled first.
    """
    bars = _progress_bars(jobs)
    queue: deque[tuple[TensorJob, Future[torch.Tensor] | None]] = deque()
    upcoming = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeme-compute")

    def submit_next() -> None:
        job = next(upcoming, None)
        if job is not None:
            # copies need no computation: the writer moves their bytes itself
            queue.append((job, None if job.copy_from else pool.submit(job.compute)))

    try:
        for _ in range(prefetch):
            submit_next()
        while queue:
            job, future = queue.popleft()
            submit_next()
            if future is None:
                writer.copy(job.spec.name, job.copy_from)
            else:
                writer.write(job.spec.name, future.result())
            bars[job.group].update()
            logger.debug("wrote %s", job.spec.name)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for bar in bars.values():
            bar.close()
