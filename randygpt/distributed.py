"""The world a run trains in: one process, or the ranks of an MPI job (data parallelism).

    mpiexec -n N randygpt train ...        N ranks (processes), on one machine or several

Every rank holds the whole model and optimizer. Each step, every rank draws the same batch of
batch x grad_accum x N rows from the same batch RNG (train.py) and trains on its own rows:
rank r on rows r*R .. (r+1)*R-1, R = batch x grad_accum, in grad_accum micro-batches
(step.py). The flat gradients are then summed over the ranks (`reduce_gradients`), so every
rank clips the same sum and takes the same AdamW step, and the weights never need sending.

Determinism. Floating-point sums depend on their order, so the order is fixed: element e of
the reduced gradient is ((g_0[e] + g_1[e]) + g_2[e]) + ..., rank by rank, exactly the order in
which one process with --grad-accum N sums its micro-batches; every rank draws the same
dropout keys and a row's mask is a hash of its row in the step's batch. So N ranks equal one
process with --grad-accum N bit for bit (same batch and thread count). The reduction is a
reduce-scatter and an all-gather, the two halves of an all-reduce: rank q sums chunk q of
every rank's gradient in rank order (MPI's own Allreduce may group its sums in any order),
then every rank gathers the summed chunks. Each rank sends and receives 2(N-1)/N x 4 bytes
per parameter per step, as a ring all-reduce does.

Faults. A rank that stops answering (dead, or stuck) would leave the others waiting forever
inside a collective: a watchdog thread ends the whole job with one line after `timeout`
seconds without an answer (a rank killed outright is noticed by mpiexec itself, which ends the
job). An error on one rank during training ends the job too (`abort`); an error that happens
while preparing happens on every rank alike (`together`), and then all ranks leave cleanly.
Signals are agreed on: the loss and any signal a rank has received travel with each step's
`exchange`, so all ranks stop after the same step.

mpi4py is imported only when the process was started by an MPI launcher (or `mpi=True`).
"""
from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from .errors import UserError
from .threads import launched_by_mpi

DEFAULT_TIMEOUT = 600.0      # seconds a rank waits for the others (rank 0 evaluates alone)


class World:
    """One process: every operation is the identity."""
    rank, size, local_size = 0, 1, 1
    comm_seconds = 0.0       # time spent communicating (benchmarks)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def reduce_gradients(self, grad: np.ndarray) -> None:
        """grad (P,) float32 := the sum over ranks of each rank's grad, in rank order."""

    def exchange(self, loss: float, signum: int | None):
        """(the step's loss summed over ranks in rank order, the signal of the lowest rank that
        has one or None): what every rank needs after a step, the same on all."""
        return loss, signum

    def share(self, values: list) -> list:
        """Rank 0's `values` (a few numbers) on every rank: its decisions (schedule.py)."""
        return list(values)

    def check_same_weights(self, flat: np.ndarray, it: int) -> None:
        """Raise on every rank if some rank's weights differ from rank 0's."""

    def together(self, fn):
        """fn() on every rank; a UserError on any rank is raised on all (see MPIWorld)."""
        return fn()

    def abort(self, code: int) -> None:
        """End every rank of the job (after an error only this rank has)."""


def weights_digest(flat: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(flat).tobytes(), digest_size=8).hexdigest()


class MPIWorld(World):
    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT):
        from mpi4py import MPI
        self.comm, self.timeout = comm, float(timeout)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        self.comm_seconds = 0.0
        self._waiting_for = None          # (what, since) while inside a collective
        self._buffers = None
        threading.Thread(target=self._watch, name="randygpt-mpi-watchdog", daemon=True).start()

    # -- the watchdog -------------------------------------------------------------------------
    @contextmanager
    def _collective(self, what: str):
        t0 = time.perf_counter()
        self._waiting_for = (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting_for = None
            self.comm_seconds += time.perf_counter() - t0

    def _watch(self) -> None:
        # mpi4py releases the GIL inside blocking MPI calls, so this thread runs meanwhile
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            waiting = self._waiting_for
            if waiting is not None and time.monotonic() - waiting[1] > self.timeout:
                sys.stderr.write(
                    f"randygpt: error: rank {self.rank}: no answer from the other ranks for "
                    f"{self.timeout:.0f} s during {waiting[0]}: a rank has died or hangs; "
                    "ending the job (the last checkpoint is kept)\n")
                _let_the_launcher_read_the_output()
                self.comm.Abort(3)

    # -- per step ------------------------------------------------------------------------------
    def reduce_gradients(self, grad: np.ndarray) -> None:
        n, size = grad.size, self.size
        chunk = -(-n // size)                             # ceil: the last chunk is padded
        if self._buffers is None or self._buffers[0].size != size * chunk:
            self._buffers = tuple(np.zeros((size, chunk), np.float32) for _ in range(3))
        send, parts, full = self._buffers                 # (N, chunk) each
        send.reshape(-1)[:n] = grad
        with self._collective("the gradient reduction"):
            self.comm.Alltoall(send, parts)               # parts[s] = rank s's chunk `rank`
            mine = parts[0].copy()
            for s in range(1, size):                      # in rank order: a fixed sum
                mine += parts[s]
            self.comm.Allgather(mine, full)               # full[q] = chunk q, summed
        grad[...] = full.reshape(-1)[:n]

    def exchange(self, loss: float, signum: int | None):
        mine = np.array([loss, signum or 0], dtype=np.float64)
        every = np.empty((self.size, 2), dtype=np.float64)
        with self._collective("the end of a step"):
            self.comm.Allgather(mine, every)
        total = float(every[0, 0])
        for r in range(1, self.size):
            total += float(every[r, 0])
        signals = [int(s) for s in every[:, 1] if s]
        return total, (signals[0] if signals else None)

    def share(self, values: list) -> list:
        buf = np.array(values, dtype=np.float64)
        with self._collective("rank 0's schedule"):
            self.comm.Bcast(buf, root=0)
        return buf.tolist()

    def check_same_weights(self, flat: np.ndarray, it: int) -> None:
        with self._collective("the weight checksum"):
            digests = self.comm.allgather(weights_digest(flat))
        drifted = [r for r, d in enumerate(digests) if d != digests[0]]
        if drifted:
            e = UserError(f"at iteration {it} the weights of rank(s) "
                          f"{', '.join(map(str, drifted))} differ from rank 0's: the ranks "
                          "have drifted apart (a different NumPy, numba or CPU on some "
                          "machine?); the last checkpoint is kept, resume it on machines alike")
            e.agreed, e.quiet = True, not self.is_root
            raise e

    def together(self, fn):
        """fn() on every rank, then every rank learns whether any rank raised a UserError. Used
        for preparing a run, which does the same on every rank: all ranks leave together with
        exit status 2; only rank 0 prints (or, when rank 0 succeeded, the ranks that failed)."""
        try:
            result, error = fn(), None
        except UserError as e:
            result, error = None, e
        with self._collective("preparing the run"):
            failed = self.comm.allgather(error is not None)
        if not any(failed):
            return result
        if error is None:
            error = UserError(f"rank(s) {', '.join(str(r) for r, f in enumerate(failed) if f)} "
                              "failed to prepare the run")
            error.quiet = True
        else:
            error.quiet = not self.is_root and failed[0]
        error.agreed = True
        raise error

    def abort(self, code: int) -> None:
        _let_the_launcher_read_the_output()
        self.comm.Abort(code)


def _let_the_launcher_read_the_output(limit: float = 5.0) -> None:
    """Flush stdout and stderr, then wait (at most `limit` s) until the launcher has read what
    is still in them, when they are pipes: under mpiexec (hydra) they are pipes to its proxy,
    which forwards them and MPI_Abort's request to mpiexec in whichever order it finds them
    ready, and mpiexec exits as soon as it has the abort. So the line just written, still in
    the pipe, was lost whenever the proxy saw both at once (often on a busy machine). Once
    the pipe is empty the proxy has read the line, and it sends it on before it looks at the
    abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import fcntl
        import termios
    except ImportError:                   # not a POSIX system: nothing to ask
        return
    deadline = time.monotonic() + limit
    for fd in (1, 2):
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            # FIONREAD on a pipe, either end: the bytes written and not yet read
            while struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] > 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        except OSError:
            continue


def open_world(timeout: float = DEFAULT_TIMEOUT, mpi: bool | None = None) -> World:
    """The world of this process: MPI's when an MPI launcher started it (or mpi=True), with
    more than one rank; else one process."""
    if mpi is None:
        mpi = launched_by_mpi(os.environ)
    if not mpi:
        return World()
    if not timeout > 0:
        raise UserError(f"{{field}} {timeout} must be a number of seconds > 0", "comm_timeout")
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("this process was started by an MPI launcher, but mpi4py is not "
                        "installed: pip install -e '.[mpi]' (mpi4py and the mpich wheel)"
                        ) from None
    comm = MPI.COMM_WORLD
    return MPIWorld(comm, timeout) if comm.Get_size() > 1 else World()
