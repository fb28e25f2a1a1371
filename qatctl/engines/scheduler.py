"""The server's scheduler: one thread drives a continuous batch (qatctl/engines/batch.py).

`qatctl serve` runs it on the process's main thread (`run()`), with the HTTP server on another:
torch's OpenMP pool belongs to the thread that first ran parallel work, and decoding from a
second thread ran 37% slower at 2 threads on a 2-core EPYC (46 vs 73 tok/s at batch 1, the
same with no HTTP at all). Library users get a worker thread by default (`thread=True`).

Requests wait in a queue and join the running batch at the next decode step (up to `max_batch`
running); each leaves when it finishes, and its Future resolves with the Completion and the
number of prompt tokens served from the prefix cache. Control calls from the HTTP side
(abort, pause/continue, flush, weight swaps) are queued to the worker and run between steps,
so the engine is only ever touched by one thread.

Weight swaps follow SGLang's /update_weights_from_disk: new requests wait, running ones finish
on the old weights, then the engine is swapped and the prefix cache flushed.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qatctl.errors import QatctlError

if TYPE_CHECKING:
    from qatctl.engines import BatchingEngine

log = logging.getLogger("qatctl.scheduler")
PAUSE_MODES = ("abort", "in_place", "retract")


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: object
    on_token: object = None
    rid: str | None = None
    future: Future = field(default_factory=Future)
    seq: object = None  # its Sequence once it joined the batch


@dataclass(frozen=True)
class Result:
    completion: object
    cached_tokens: int
    weight_version: str | None = None  # the label of the weights that served it (swap's `label`)


class Scheduler:
    MAX_BATCH, MAX_QUEUE = 32, 4096  # serve's --max-batch and --max-queue defaults

    def __init__(self, engine: BatchingEngine, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 thread: bool = True):
        if max_batch < 1:
            raise QatctlError(f"scheduler: max_batch={max_batch} must be >= 1")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.batch = engine.open_batch()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[object, Job] = {}  # Sequence -> Job
        self._calls: list[tuple] = []  # (fn, Future) to run on the worker between steps
        self._swap: tuple | None = None  # (engine, Future) waiting for the batch to drain
        self.paused = False
        self.label: str | None = None  # the served weights' label (weight_version)
        self.steps = self.largest_batch = 0
        self._stop = None  # run(): a callable saying when to return
        if thread:
            threading.Thread(target=self._loop, name="qatctl-scheduler", daemon=True).start()

    def run(self, stop=lambda: False) -> None:
        """Drive the batch in the calling thread until stop() is true (checked twice a second)."""
        self._stop = stop
        self._loop()

    # ------------------------------------------------------------ called from any thread
    def submit(self, prompt_ids: list[int], params, on_token=None, rid: str | None = None) -> Future:
        """Queue one request; the Future gives a Result (or the engine's error)."""
        job = Job(prompt_ids, params, on_token, rid)
        with self._cv:
            self._waiting.append(job)
            self._cv.notify()
        return job.future

    def has_room(self, k: int) -> bool:
        """Whether k more requests fit in the waiting queue (max_queue)."""
        with self._cv:
            return len(self._waiting) + k <= self.max_queue

    def call(self, fn) -> Future:
        """Run fn() on the worker thread between decode steps (even while paused)."""
        fut: Future = Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def abort(self, rid: str | None = None, abort_all: bool = False) -> Future:
        """Abort the request(s) with this rid, or all: they finish with finish_reason 'abort'.
        The Future gives how many were aborted."""
        return self.call(lambda: self._abort(lambda j: abort_all or (rid is not None and j.rid == rid)))

    def cancel(self, fut: Future) -> None:
        """Abort the request behind `fut` (its client went away)."""
        self.call(lambda: self._abort(lambda j: j.future is fut))

    def pause(self, mode: str = "abort") -> Future:
        """SGLang's pause_generation: 'abort' aborts everything in flight and pauses; 'in_place' and
        'retract' keep the requests (with their KV: nothing is recomputed) until continue."""
        if mode not in PAUSE_MODES:
            raise QatctlError(f"pause: mode={mode!r}; expected one of {', '.join(PAUSE_MODES)}")

        def run():
            self.paused = True
            return self._abort(lambda j: True) if mode == "abort" else 0
        return self.call(run)

    def resume(self) -> Future:
        def run():
            self.paused = False
        return self.call(run)

    def flush_cache(self) -> Future:
        """Flush the prefix cache. As in SGLang, refused (False) while requests run or wait."""
        def run():
            if self._running or self._waiting:
                return False
            self.engine.flush_cache()
            return True
        return self.call(run)

    def swap(self, engine: BatchingEngine, label: str | None = None) -> Future:
        """Serve `engine` (labelled `label`, e.g. a weight_version) from now on: new requests
        wait, running ones finish on the old engine and report the old label."""
        fut: Future = Future()
        with self._cv:
            if self._swap is not None:
                fut.set_exception(QatctlError("a weight update is already in progress"))
                return fut
            self._swap = (engine, fut, label)
            self._cv.notify()
        return fut

    def state(self) -> dict:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting), "paused": self.paused,
                    "steps": self.steps, "largest_batch": self.largest_batch}

    # ------------------------------------------------------------ the worker
    def _abort(self, which) -> int:
        n = 0
        with self._cv:
            waiting = [j for j in self._waiting if which(j)]
            for j in waiting:
                self._waiting.remove(j)
        for j in waiting:
            from qatctl.engines import Completion

            j.future.set_result(Result(Completion(prompt_ids=list(j.prompt_ids), finish_reason="abort"), 0, self.label))
            n += 1
        for seq, j in list(self._running.items()):
            if which(j):
                self.batch.abort(seq)
                self._done(seq)
                n += 1
        return n

    def _free_slots(self) -> int:
        """How many waiting requests may join now (bench/serve.py overrides it to measure the
        run-to-completion scheduler this one replaced)."""
        return self.max_batch - len(self._running)

    def _done(self, seq) -> None:
        job = self._running.pop(seq)
        job.future.set_result(Result(seq.completion, seq.cached_tokens, self.label))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._calls or (self._swap and not self._running)
                           or (not self.paused and (self._running or (self._waiting and not self._swap)))):
                    if self._stop is not None and self._stop():
                        return
                    self._cv.wait(timeout=None if self._stop is None else 0.5)
                calls, self._calls = self._calls, []
                admit = []
                if not self.paused and not self._swap:
                    while self._waiting and len(admit) < self._free_slots():
                        admit.append(self._waiting.popleft())
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(e)
            if self._swap and not self._running:
                self._do_swap()
            for job in admit:
                if not job.future.set_running_or_notify_cancel():
                    continue
                try:
                    seq = self.batch.add(job.prompt_ids, job.params, on_token=job.on_token, tag=job)
                except Exception as e:  # noqa: BLE001 - a bad request fails alone
                    job.future.set_exception(e)
                    continue
                if seq.done:  # max_new_tokens 0
                    job.future.set_result(Result(seq.completion, 0, self.label))
                else:
                    self._running[seq] = job
            if self.paused or not self._running:
                continue
            self.steps += 1
            self.largest_batch = max(self.largest_batch, len(self._running))
            try:
                finished = self.batch.step()
            except Exception as e:  # noqa: BLE001 - every running request gets the error
                log.exception("decode step failed")
                for seq in list(self._running):
                    self._running.pop(seq).future.set_exception(e)
                self.batch = self.engine.open_batch()
                continue
            for seq in finished:
                self._done(seq)

    def _do_swap(self) -> None:
        with self._cv:
            (engine, fut, label), self._swap = self._swap, None
        old = self.engine
        self.engine = engine
        if label is not None:
            self.label = label
        self.batch = engine.open_batch()
        if engine is old:  # weights updated in place: cached prompts' KV is stale
            engine.flush_cache()
        fut.set_result(True)
