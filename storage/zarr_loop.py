"""zarr's event loop, seen from the threads that call it.

zarr runs every store operation as a task on one event loop in its own thread; a caller waits for
the result.  When the caller stops waiting (``SIGTERM`` raised as ``SystemExit`` in the main thread,
Ctrl-C), the task runs on: a folder removed meanwhile is made again when it finishes (a group
still being created, a chunk still being written).  :func:`settle` waits for those tasks first.
It reads zarr's loop from ``zarr.core.sync`` (``loop[0]``, ``iothread[0]``: 3.0 to 3.4), and does
nothing when zarr was never used in this process.
"""

from __future__ import annotations

import asyncio
import sys
import threading


def settle(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until no task but this one runs on zarr's event loop."""
    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0] if sync is not None else None
    if loop is None or not loop.is_running() or threading.current_thread() is getattr(sync, "iothread", [None])[0]:
        return

    async def others_done() -> None:
        me = asyncio.current_task()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:  # a task may start another before it ends
            others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not others:
                return
            await asyncio.wait(others, timeout=left)

    try:
        asyncio.run_coroutine_threadsafe(others_done(), loop).result(timeout_s + 1.0)
    except Exception:  # noqa: BLE001 (a task's own failure, or the wait's timeout: the removal goes on regardless)
        pass
