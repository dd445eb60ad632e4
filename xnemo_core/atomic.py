"""Atomic file writes: readers see the old file or the complete new one, never a half-written file.

Why: models, motion files and caches are written while other processes (ComfyUI, a resumed training
run) may read them, and an interrupted write must not leave a truncated file under the real name.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=target.suffix + ".tmp", dir=target.parent.absolute())
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
