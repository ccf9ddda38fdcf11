"""`type = "file"`: tails the files that globs match, one line per message, through rotation and crashes.

Split by concern, as Vector's file source is:

- `config`: the `[sources.NAME]` table (README's option table is made from it);
- `identity`: who a file is (device, inode, checksum of its first bytes, generation) and its stream id;
- `discovery`: the globs, what they match now (a failed listing is not an empty one), change events;
- `reader`: one file's read position and its bytes cut into line messages;
- `rotation`: where a rotated or truncated file's rest is (the renamed file, copytruncate's copy);
- `checkpoints`: the checkpoint entries and their models (storage is relay/checkpoints.py);
- `descriptors`: how many files may be held open, and closing idle ones beyond that;
- `tail`: `FileTail`, the reader the source engine runs (relay/sources/engine.py: it owns the cap of
  unsettled lines per file, the byte budget, chunks and when to commit): scans, reads, resuming,
  rotation, checkpoints moved by `commit`.

A line's position is (source, file identity, byte offset past the line), stable across restarts, so
a line delivered again after a crash carries the same idempotency key.
"""

from __future__ import annotations

from pathlib import Path

from relay.sources.file.config import Config
from relay.sources.file.tail import FileTail

__all__ = ["FIELDS", "Config", "FileTail", "build"]

# The template fields and `when` keys a line carries (its data is the line: json.* when it is JSON).
FIELDS = ("file.path", "file.name", "file.line", "file.offset", "json.*")


def build(name: str, config: Config, state_dir: Path) -> FileTail:
    return FileTail(name, config, state_dir)
