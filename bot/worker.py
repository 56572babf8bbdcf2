"""Per-thread serialized executor: same key runs in order, different keys in parallel.

Bolt listener threads only enqueue here and return, so acks stay fast. Each busy key gets
its own thread (a key's work may block for hours while its run trains), so busy projects
never starve others of a worker; `max_queued` bounds the total.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class ThreadWorker:
    def __init__(self, max_workers: int = 8, max_queued: int = 1000) -> None:
        # max_workers no longer caps busy keys: a fixed pool of N threads was exhausted by
        # N projects training at once and the bot stopped answering everyone else.
        del max_workers
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Callable[[], Any]]] = {}
        self._max_queued = max_queued
        self._queued = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False
        # separate pool so urgent clicks never wait behind long per-thread work
        self._urgent = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tuner-urgent")

    def submit(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Queue fn for `key`. False when the worker is saturated (caller should tell the user)."""

        def task() -> Any:
            return fn(*args, **kwargs)

        with self._lock:
            if self._closed or self._queued >= self._max_queued:
                return False
            self._queued += 1
            q = self._queues.get(key)
            if q is not None:  # a drain loop for this key is running; it will pick this up
                q.append(task)
                return True
            self._queues[key] = deque([task])
            t = threading.Thread(target=self._drain, args=(key,), daemon=True,
                                 name=f"tuner-work-{key}")
            self._threads.add(t)
        t.start()
        return True

    def run_now(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Unserialized work (e.g. a Stop click) that must not queue behind a busy thread."""
        try:
            self._urgent.submit(self._safe, fn, *args, **kwargs)
        except RuntimeError:  # shut down
            log.warning("worker closed; dropped urgent task")

    def _safe(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            log.exception("background task failed")

    def _drain(self, key: str) -> None:
        while True:
            with self._lock:
                q = self._queues[key]
                if not q:
                    del self._queues[key]
                    self._threads.discard(threading.current_thread())
                    self._idle.notify_all()
                    return
                task = q.popleft()
            try:
                task()
            except Exception:  # noqa: BLE001
                log.exception("task for %s failed", key)
            finally:
                with self._lock:
                    self._queued -= 1

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until no serialized work is queued or running (tests, shutdown)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queues, timeout=timeout)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if wait:
            for t in threads:
                t.join()
        self._urgent.shutdown(wait=wait)
