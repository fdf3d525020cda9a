"""Work done ahead in threads of their own: reading, the network and writing results overlap on a machine's cores."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")
_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def ahead(items: Iterable[T], step: Callable[[T], U], depth: int = 1) -> Iterator[U]:
    """step(item) for each item, in order, computed in a thread of its own up to depth items ahead of whoever consumes
    them. Stacked (ahead(ahead(batches, read), run)), each stage runs beside the others: OpenCV's decoding and
    ONNX Runtime's network release the GIL while busi's Python builds the results of the batch before. An error in
    step or in items is raised to the consumer, in its place; a consumer that stops early stops the thread."""
    done: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                done.put(value, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(step(item)):
                    return
        except BaseException as e:  # noqa: BLE001  (raised again in the consumer's thread)
            put(_Failed(e))
            return
        put(_END)

    thread = threading.Thread(target=work, name=f"busi-ahead-{getattr(step, '__name__', 'step')}", daemon=True)
    thread.start()
    try:
        while True:
            value = done.get()
            if value is _END:
                return
            if isinstance(value, _Failed):
                raise value.error
            yield value
    finally:
        stop.set()


def import_ahead(*modules: str) -> threading.Thread:
    """Import modules in a thread of their own while the caller runs the network: a command's plotting and metrics
    libraries cost seconds of one core when the network leaves cores idle. Join the thread before importing any of
    them (or anything they import) elsewhere: two threads importing one library at once can meet in its import
    cycles and fail ("partially initialized module"). An error here is left for the caller's own import to raise."""
    import importlib

    def load():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the caller's own import reports it where it matters
                pass
    thread = threading.Thread(target=load, name="import-ahead", daemon=True)
    thread.start()
    return thread
