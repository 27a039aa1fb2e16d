"""`Prefetch`: run an iterator in a background thread, a few items ahead of its consumer."""
from __future__ import annotations

import queue
import threading
from typing import Iterator


class Prefetch:
  """Runs an iterator in a background thread, `size` items ahead; close() (or dropping the last
  reference) stops it. An exception raised by the iterator is raised again by `next`."""

  _END = object()

  def __init__(self, iterator: Iterator, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    # The thread holds only the queue and the event, so an abandoned Prefetch can be collected.
    self._thread = threading.Thread(target=Prefetch._run,
                                    args=(iterator, self._queue, self._stop), daemon=True)
    self._thread.start()

  @staticmethod
  def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  @staticmethod
  def _run(iterator: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    try:
      for item in iterator:
        if not Prefetch._put(q, stop, item):
          return
    except BaseException as e:  # handed to the consumer
      Prefetch._put(q, stop, (Prefetch._END, e))
      return
    Prefetch._put(q, stop, (Prefetch._END, None))

  def __iter__(self) -> "Prefetch":
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, tuple) and len(item) == 2 and item[0] is Prefetch._END:
      self._stop.set()
      if item[1] is not None:
        raise item[1]
      raise StopIteration
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5.0)

  def __del__(self) -> None:
    self._stop.set()

  def __enter__(self) -> "Prefetch":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
