"""Process pools for corpus work (synthesis, augmentation)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context

__all__ = ["pool_context"]


def pool_context(*preload: str) -> multiprocessing.context.BaseContext:
    """A start method that is safe in a multi-threaded parent (torch, tqdm) and cheap.

    ``fork`` from a threaded parent can deadlock. ``spawn`` re-imports the task's module
    in every worker of every call (~2 s, mostly scipy.signal). ``forkserver`` imports it
    once in a clean server process and forks workers from there; it needs the same
    picklable, top-level task function as ``spawn``.

    Args:
        preload: modules the fork server imports up front (the task functions' modules).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only takes effect if no forkserver runs yet in this process; harmless otherwise.
    context.set_forkserver_preload(["__main__", *preload])
    return context
