"""The JSON-lines files bookkeeping appends to, shared by every thread and process of a host (one `flock` each).

A kill or a full disk mid-append leaves an unfinished last line: the next append cuts it off first (`repaired`),
so no entry is ever glued onto it, and readers skip any line they cannot read (an unfinished one, or one glued by
an older version) instead of raising: a bad line costs that entry, never the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def repaired(path: Path) -> int:
    """Cut an unfinished last line off `path` (the caller holds its lock); the file's size after."""
    try:
        handle = open(path, "r+b")  # noqa: SIM115 (closed below; opened here to answer 0 when missing)
    except FileNotFoundError:
        return 0
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return size
        end = size
        while end > 0:  # back to the last newline, a block at a time
            start = max(end - 4096, 0)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("%s: an unfinished last line (%d bytes) was cut off before appending", path, size - end)
    return end


def append(path: Path, lines: bytes) -> None:
    """Append whole lines, flushed to disk (the caller holds the file's lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repaired(path)
    with open(path, "ab") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def entry(line: bytes) -> dict | None:
    """One line's JSON object; None (logged) for a line that holds none."""
    try:
        value = json.loads(line)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("a bookkeeping line that is no JSON object was skipped: %r", line[:80])
        return None
    return value
