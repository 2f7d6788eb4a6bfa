"""Files written whole: a process killed while writing one, or two processes writing the same path, never leave half
of it where it is read (checkpoints, the training history, the decoded-image cache)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def written_whole(path: Path, mode: str = "wb", **options) -> Iterator[IO]:
    """An open file of this process's own beside `path` (``open``'s `mode` and `options`); it replaces `path` when the
    block ends without an error, and is removed when it does not."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(handle, mode, **options) as file:
            yield file
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
