"""The service's threads: named pools, and the one that blocking work of a request is handed to.

Python 3.11 names threads only for itself; the kernel sees every one as `python`. The pools here also give each
OS thread its Python name (Linux keeps the first 15 bytes: `imageai-infer_0`, `imageai-offload`), so that
`top -H`, `ps -L` and /proc/<pid>/task/*/comm tell inference and decoding apart from the event loop, which is the
process's main thread. load_tests/bench.py splits the service's CPU per request that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_PR_SET_NAME = 15  # <linux/prctl.h>
INFERENCE_THREADS = "imageai-infer"  # the batcher's onnxruntime calls
OFFLOAD_THREADS = "imageai-offload"  # decoding uploads, warm-up, explanations without the batcher


def name_os_thread() -> None:
    """Give the calling OS thread its Python thread's name (Linux only; elsewhere nothing happens)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def named_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads the OS knows as `name` (see the module's docstring)."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix=name, initializer=name_os_thread)


# Decoding, resizing and onnxruntime release the GIL, so they run in threads: decoding uploads, warm-up, explanations
# without the batcher. asyncio's executor hands a call to a thread for about a third of the CPU that
# anyio.to_thread.run_sync takes under load (docs/performance.md); as many threads as anyio's default limit, started
# as needed.
_OFFLOAD = named_pool(40, OFFLOAD_THREADS)


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread, in a copy of the caller's context (the request's log fields), awaited:
    what asyncio.to_thread does, on a pool of our own rather than the loop's default (a few threads for DNS too)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_OFFLOAD, context.run, function, *args)
