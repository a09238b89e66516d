"""Run the pipeline with a merge slowed down after its first tensor, so a test can kill the
process while the merge is half-written. Usage: python -m tests.pipeline.slow_merge CONFIG
WORKSPACE MARKER (MARKER is created when the merge has started writing)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mergeme.io.safetensors_writer import CheckpointWriter


def main(config: str, workspace: str, marker: str) -> None:
    write = CheckpointWriter.write

    def slow_write(self, name, tensor):
        write(self, name, tensor)
        Path(marker).touch()
        time.sleep(5)

    CheckpointWriter.write = slow_write
    from flows.pipeline import merge_pipeline

    merge_pipeline(config, workspace)


if __name__ == "__main__":
    main(*sys.argv[1:4])
