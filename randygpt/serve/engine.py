"""The decode loop: one thread owns one Session and decodes every request's streams together.

    HTTP handlers (asyncio)                       decode thread (this file)
      engine.submit(job)  -> waiting (bounded) ->   admit jobs while the Session has free streams
      await job.events.get()   <- call_soon_threadsafe   <- session.step(): one token for
      engine.cancel(job)  (client left)      ->     every active stream, ONE batched decode

A job is one choice (one stream): a request with n choices over p prompts submits n * p jobs.
The waiting line holds at most `queue` jobs beyond the `max_batch` being decoded; a submit
past that raises QueueFull (the server answers 429 with Retry-After). A cancelled job leaves
the Session before the next step, so a client that disconnects costs at most one more token.
If a step fails, every job in it gets an error event and the loop carries on with a fresh
Session (its KV cache state is no longer trusted).
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..sample import SamplingConfig
from ..session import Session


class QueueFull(Exception):
    pass


@dataclass
class Job:
    ids: list                                 # prompt token ids (already validated)
    max_tokens: int
    sampling: SamplingConfig
    stop: list
    rng: np.random.Generator
    logprobs: int | None = None
    index: int = 0                            # the choice's index in its response
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None       # (index, Event), or (index, Exception): failed
    cancelled: bool = False
    stream: int | None = None                 # the Session stream while decoding


def deliver_all(pairs) -> None:
    """Put (job.index, item) on each job's event queue, with one wake-up of each event loop
    rather than one per item: each call_soon_threadsafe writes to the loop's wake-up pipe
    (a system call), and a step of 32 streams would make 32 of them."""
    by_loop: dict = {}
    for job, item in pairs:
        by_loop.setdefault(job.loop, []).append((job.events, (job.index, item)))
    for loop, puts in by_loop.items():
        loop.call_soon_threadsafe(_put_all, puts)


def _put_all(puts) -> None:
    for events, item in puts:
        events.put_nowait(item)


@dataclass
class Stats:
    steps: int = 0                            # batched decode steps
    tokens: int = 0                           # tokens sampled, all streams
    peak_batch: int = 0                       # most streams decoded in one step
    cancelled: int = 0
    failed_steps: int = 0
    batch_sizes: dict = field(default_factory=dict)   # streams per step -> number of steps


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, queue: int = 64):
        if max_batch < 1 or queue < 0:
            raise ValueError("max_batch must be >= 1 and queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.queue = max_batch, queue
        self.session = Session(model, tokenizer, max_batch)
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}    # Session stream -> its job
        self._calls: deque = deque()          # (fn, future) for call()
        self._cond = threading.Condition()
        self._closed = self._paused = False
        self._thread = threading.Thread(target=self._loop, name="randygpt-decode", daemon=True)
        self._thread.start()

    # ---- called from the event loop ------------------------------------------------------
    def submit(self, jobs: list[Job]) -> asyncio.Queue:
        """Queue all of a request's jobs, or none (QueueFull); their events arrive, tagged
        with each job's index, on the returned queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            if len(self._waiting) + len(jobs) > self.queue + self.session.free:
                raise QueueFull(f"{len(self._waiting)} choices are waiting for a free stream "
                                f"(at most {self.queue})")
            for job in jobs:
                job.loop, job.events = loop, events
                self._waiting.append(job)
            self._cond.notify()
        return events

    async def call(self, fn):
        """fn() run on the decode thread between two steps (the model's ops are not shared
        across threads), e.g. scoring a prompt; returns its result or raises its error."""
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            self._calls.append((fn, future))
            self._cond.notify()
        return await future

    def cancel(self, jobs) -> None:
        with self._cond:
            for job in jobs:
                job.cancelled = True
            self._cond.notify()

    @property
    def busy(self) -> dict:
        with self._cond:
            return {"streams_active": len(self._running), "choices_waiting": len(self._waiting)}

    def pause(self) -> None:
        """Hold the loop before its next step (jobs still queue): lets a caller line up
        requests that must start in the same step."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the decode thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._calls and (
                        self._paused or not (self._waiting or self._running)):
                    self._cond.wait()
                if self._closed:
                    break
                calls, self._calls = self._calls, deque()
            for fn, future in calls:
                self._run_call(fn, future)
            with self._cond:
                if self._paused:
                    continue
                self._drop_cancelled()
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.max_batch:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        admit.append(job)
            try:
                if admit:                      # prefill outside the lock: submit never waits
                    streams = self.session.submit_all(   # every prompt in one decode call
                        [dict(prompt=job.ids, max_tokens=job.max_tokens, sampling=job.sampling,
                              stop=job.stop, rng=job.rng, logprobs=job.logprobs)
                         for job in admit])
                    for job, stream in zip(admit, streams):
                        job.stream = stream
                        self._running[stream] = job
                if self._running:
                    self._step()
            except Exception as e:             # a bug or a fault: fail these jobs, not the server
                self.stats.failed_steps += 1
                failed = {id(j): j for j in [*admit, *self._running.values()]}.values()
                deliver_all((job, e) for job in failed)
                self._running.clear()
                self.session = Session(self.model, self.tokenizer, self.max_batch)

    @staticmethod
    def _run_call(fn, future) -> None:
        try:
            result, error = fn(), None
        except Exception as e:
            result, error = None, e

        def settle():
            if not future.done():
                future.set_exception(error) if error else future.set_result(result)
        future.get_loop().call_soon_threadsafe(settle)

    def _drop_cancelled(self) -> None:
        for s, job in list(self._running.items()):
            if job.cancelled:
                self.session.cancel(s)
                del self._running[s]
                self.stats.cancelled += 1
        if any(j.cancelled for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled)

    def _step(self) -> None:
        n = len(self._running)
        events = self.session.step()
        st = self.stats
        st.steps += 1
        st.tokens += n
        st.peak_batch = max(st.peak_batch, n)
        st.batch_sizes[n] = st.batch_sizes.get(n, 0) + 1
        pairs = []
        for event in events:
            job = self._running[event.stream]
            if event.finish_reason is not None:
                del self._running[event.stream]
            pairs.append((job, event))
        deliver_all(pairs)
