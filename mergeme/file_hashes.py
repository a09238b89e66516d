"""File hashes remembered in the workspace, so an unchanged checkpoint is not read again.

Fetch hashes every checkpoint file on every run (a 7B expert is about 14 GB). A file whose
path, size, modification time, change time and inode are what they were when it was last
hashed is taken to hold the same bytes; any edit, ``touch`` or replacement changes one of
them and the file is read again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mergeme.checkpoint import sha256_file

logger = logging.getLogger(__name__)

CACHE_FILE = "file_hashes.json"


def _stat_key(file: Path) -> list[int]:
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


class FileHashCache:
    """sha256 of files, kept in ``store`` (a JSON file) between runs.

    ``computed`` lists the files actually read since the cache was opened.
    """

    def __init__(self, store: Path | None = None):
        self.store = Path(store) if store is not None else None
        self.computed: list[Path] = []
        self._entries: dict[str, dict] = {}
        if self.store is not None and self.store.is_file():
            try:
                self._entries = json.loads(self.store.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("ignoring unreadable hash cache %s; files are hashed again", store)

    @classmethod
    def in_workspace(cls, workspace: Path) -> FileHashCache:
        return cls(Path(workspace) / CACHE_FILE)

    def digest(self, file: Path) -> str:
        """The sha256 of ``file``: remembered if its stat is unchanged, else read and kept."""
        path = str(Path(file).resolve())
        stat = _stat_key(Path(file))
        entry = self._entries.get(path)
        if entry is not None and entry.get("stat") == stat:
            return entry["sha256"]
        value = sha256_file(Path(file))
        # the stat after reading: a file written while it was read gets hashed again next time
        if _stat_key(Path(file)) == stat:
            self._entries[path] = {"stat": stat, "sha256": value}
        self.computed.append(Path(file))
        return value

    def save(self) -> None:
        """Write the cache (atomically: a concurrent reader sees the old or the new file)."""
        if self.store is None:
            return
        self.store.parent.mkdir(parents=True, exist_ok=True)
        partial = self.store.with_name(f".{self.store.name}.{os.getpid()}")
        partial.write_text(json.dumps(self._entries, sort_keys=True))
        os.replace(partial, self.store)
