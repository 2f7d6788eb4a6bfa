"""Files written whole: a process killed while writing one, or two processes writing the same path, never leave half
of it where it is read (checkpoints, the training history, the decoded-image cache); and a run folder written by one
process at a time."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: run folders go unlocked
    fcntl = None


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


@contextmanager
def sole_writer(folder: Path) -> Iterator[None]:
    """Hold `folder`/.lock while the block runs: an advisory lock that the system releases when the process ends,
    however it ends, so that a crashed run can be resumed at once but a second process (a resume started while the
    run still goes) cannot write into the folder beside it (RuntimeError)."""
    with open(folder / ".lock", "w") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{folder} is in use by another training process: let it end, or stop it") from None
        yield
