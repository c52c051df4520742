"""Which kernel runs each float32 product: chosen by timing on this machine, not by CPU flags.

The own sgemm (sgemm.py) beat OpenBLAS 2x on an AMD Zen 5 and lost 3x on an Intel Xeon with
the same AVX-512 flags; a rule written on one CPU is wrong on the next. So the first time a
product shape is met, both candidates run on the real arrays and the faster is kept:

    kind "rows": a (M, K) @ b (K, N)   OpenBLAS  | sgemm.sgemm        (x @ W, dout @ W^T)
    kind "deep": a (M, K) @ b (K, N)   OpenBLAS  | sgemm.sgemm_deep   (x^T dout, K >> M)

Near-ties go to OpenBLAS (the own kernel must be MARGIN faster), and products under
SMALL_FLOPS stay on OpenBLAS untimed (the own kernels start threads; at that size they never
win, and generation meets a new small shape at every batch size). Decisions are kept on disk
(`decision_file`), keyed by what they depend on: CPU model and LLVM's target, NumPy, numba and
BLAS versions, OPENBLAS_CORETYPE, both thread counts and the shape; later runs start at once.
A decision stays until that file is deleted, with one exception: each records the load per
core when it was timed, and one timed on a busy machine (load per core > BUSY) is timed
again by the first process that starts on a quiet one (< QUIET). Under load the candidates'
calls are interleaved and the fastest of each counts, which keeps a wrong choice rare, but
not impossible.

    RANDYGPT_SGEMM=auto (default) | blas | own     force either (own: every float32 product)
    RANDYGPT_OWN_SGEMM=0                           the older switch, same as blas

The own kernels are candidates only where they compile and run here (tried once, on a 2 x 2
product); an own kernel that fails is never chosen. The weight-gradient kernel (sgemm_deep)
is not even compiled (~5 s of a first run) where the row kernel took HOPELESS times
OpenBLAS's time or more on every one of at least 3 product shapes already timed: the two
share their register block, and on such a machine (an Intel Xeon with AVX-512 measured 2.6-
4.2x) it never won either. Forward products come first in a step, so those timings exist.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time

import numpy as np

MODES = ("auto", "blas", "own")
MARGIN = 0.10            # the own kernel must take <= 90% of OpenBLAS's time to be chosen
SMALL_FLOPS = 1 << 21    # 2 M K N below this: OpenBLAS, untimed
REPEATS = 5              # timed calls per candidate (after one warm-up); the minimum counts
HOPELESS = 1.5           # the own row kernel this many times slower everywhere: no deep kernel


def mode_from_environment(environ=os.environ) -> str:
    mode = environ.get("RANDYGPT_SGEMM", "").strip().lower()
    if not mode:
        return "blas" if environ.get("RANDYGPT_OWN_SGEMM") == "0" else "auto"
    if mode not in MODES:
        from ...errors import UserError
        raise UserError(f"RANDYGPT_SGEMM={mode!r} is not a kernel choice; use one of "
                        f"{', '.join(MODES)}", "backend")
    return mode


def cpu_model() -> str:
    """e.g. 'AMD EPYC (family 23 model 1)': the model name and, on x86, its family/model."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                                   # the first CPU is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def blas_name() -> str:
    """e.g. 'scipy-openblas 0.3.29' (NumPy's build record; no threadpoolctl at run time)."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '?')}"
    except Exception:
        return "unknown BLAS"


def machine_key() -> str:
    import llvmlite.binding as llvm
    import numba

    from . import jit
    return " | ".join([cpu_model(), f"llvm target {llvm.get_host_cpu_name()}",
                       f"numpy {np.__version__}", f"numba {numba.__version__}", blas_name(),
                       f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}",
                       f"vectors {jit.vector_tuning()}"])


def decision_file() -> str:
    root = os.environ.get("RANDYGPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "randygpt")
    return os.path.join(root, "kernels.json")


def _threads():
    import numba

    from ...blas import get_blas_threads
    return numba.get_num_threads(), get_blas_threads()


def _best_times(fns, repeats=REPEATS):
    """The fastest of `repeats` calls of each function, calls interleaved (a, b, a, b, ...) so
    that a burst of load from other processes falls on both candidates alike."""
    for fn in fns:
        fn()                                            # warm-up (and compilation)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def load_per_core() -> float:
    """The 1-minute load average over the cores: > 1 means other work waited for a core."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


BUSY, QUIET = 1.0, 0.5    # load per core: a decision timed above BUSY is re-timed below QUIET


def read_decisions(path) -> dict:
    """This machine's decisions in the file at `path` ({machine key: {key: decision}}). A
    decision timed while the machine was busy (other processes took the candidates' cores,
    and the one that lost may only have waited longer) is left out when the machine is now
    quiet, so it is timed again; on a busy machine it stands."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):                       # none yet, or unreadable: measure
        return {}
    mine = data.get(machine_key(), {}) if isinstance(data, dict) else {}
    if not isinstance(mine, dict):
        return {}
    if load_per_core() < QUIET:
        mine = {k: d for k, d in mine.items()
                if not (isinstance(d, dict) and d.get("load_per_core", 0) > BUSY)}
    return mine


def save_decision(path, key, decision) -> None:
    decision = dict(decision, load_per_core=round(load_per_core(), 2))
    # read-merge-replace: another process's decisions survive; a lost race only means a
    # shape is measured again. An unwritable cache keeps decisions in memory.
    try:
        try:
            with open(path) as f:
                data = json.load(f)
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(machine_key(), {})[key] = decision
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernels.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


class KernelChoice:
    """The fused backend's kernel decisions: `kernel(kind, a, b, out)` -> "blas" or "own".
    `ran`: the kernel each timed product shape ran in this process (for benchmarks); forced
    choices and small products are not recorded (they cost nothing to decide)."""

    def __init__(self, mode: str | None = None, path: str | None = None, timer=_best_times):
        self.mode = mode_from_environment() if mode is None else mode
        if self.mode not in MODES:
            from ...errors import UserError
            raise UserError(f"kernel choice {self.mode!r} is not one of {', '.join(MODES)}",
                            "backend")
        self.path = decision_file() if path is None else path
        self.timer = timer
        self.decisions: dict[str, dict] = {}           # shape key -> {"kernel", times}
        self.ran: dict[str, str] = {}                   # shape key -> kernel, this process
        self._loaded = False
        self._own_works: dict[str, bool] = {}         # kind -> compiles and is right here
        self._lock = threading.Lock()

    def __repr__(self):
        return f"KernelChoice(mode={self.mode!r})"

    # ---- the decision ---------------------------------------------------------------------
    def kernel(self, kind, a, b, out) -> str:
        if out.dtype != np.float32:
            return "blas"
        M, K = a.shape
        N = b.shape[1]
        if self.mode != "auto" or 2 * M * K * N < SMALL_FLOPS:
            return "own" if self.mode == "own" else "blas"
        key = f"{kind} {M}x{K}x{N} threads {'/'.join(map(str, _threads()))}"
        decision = self.decisions.get(key)
        if decision is None:
            with self._lock:
                self._load()
                decision = self.decisions.get(key) or self._measure(key, kind, a, b, out)
        self.ran[key] = decision["kernel"]
        return decision["kernel"]

    def _measure(self, key, kind, a, b, out):
        from . import sgemm
        blas = lambda: np.matmul(a, b, out=out)                               # noqa: E731
        own_fn = sgemm.sgemm if kind == "rows" else sgemm.sgemm_deep
        own = lambda: own_fn(a, b, out)                                       # noqa: E731
        skipped = kind == "deep" and self.own_row_kernel_hopeless()
        if not skipped and self.own_works(kind):
            t_blas, t_own = self.timer([blas, own])
        else:
            t_blas, t_own = self.timer([blas])[0], float("inf")
        winner = "own" if t_own <= (1 - MARGIN) * t_blas else "blas"
        decision = {"kernel": winner, "blas_s": t_blas,
                    "own_s": None if t_own == float("inf") else t_own}
        if skipped:
            decision["own_skipped"] = f"the own row kernel took >= {HOPELESS}x OpenBLAS's time"
        self.decisions[key] = decision
        self._save(key, decision)
        return decision

    def own_works(self, kind: str = "rows") -> bool:
        """Whether the own kernel for `kind` compiles and gives the right answer here."""
        if kind not in self._own_works:
            try:
                from . import sgemm
                a = np.array([[1, 2], [3, 4]], np.float32)
                got = sgemm.sgemm(a, a) if kind == "rows" else \
                    sgemm.sgemm_deep(a, a, np.empty((2, 2), np.float32))
                self._own_works[kind] = bool((got == a @ a).all())
            except Exception:
                self._own_works[kind] = False
        return self._own_works[kind]

    def own_row_kernel_hopeless(self) -> bool:
        """The own row kernel took >= HOPELESS x OpenBLAS's time on each of >= 3 shapes timed
        (with these thread counts): its deep twin is then not worth compiling or timing."""
        suffix = f" threads {'/'.join(map(str, _threads()))}"
        timed = [d for k, d in self.decisions.items()
                 if k.startswith("rows ") and k.endswith(suffix) and d.get("own_s")]
        return len(timed) >= 3 and all(d["own_s"] >= HOPELESS * d["blas_s"] for d in timed)

    # ---- on disk ---------------------------------------------------------------------------
    def _load(self):
        if not self._loaded:
            self._loaded = True
            mine = read_decisions(self.path)
            self.decisions.update({k: v for k, v in mine.items()
                                   if isinstance(v, dict) and v.get("kernel") in ("blas", "own")})

    def _save(self, key, decision):
        save_decision(self.path, key, decision)

    def summary(self) -> list[str]:
        """One line per product shape this process ran: which kernel, and the timings."""
        lines = []
        for key, kernel in sorted(self.ran.items()):
            d = self.decisions.get(key, {})
            times = "" if not d else f"  (OpenBLAS {d['blas_s'] * 1e3:.3f} ms, own " + (
                ("not timed" if d.get("own_skipped") else "n/a") if d.get("own_s") is None
                else f"{d['own_s'] * 1e3:.3f} ms") + ")"
            lines.append(f"{key}: {kernel}{times}")
        return lines


# --------------------------------------------------------------------------------------------
# Threads per parallel kernel

THREAD_MODES = ("auto", "all", "1")


def choice_from_environment(name, modes, what, environ=os.environ) -> str:
    """The value of environment variable `name`, one of `modes` (the first when unset); any
    other value is a one-line UserError naming `what` it should have been."""
    mode = environ.get(name, "").strip().lower() or modes[0]
    if mode not in modes:
        from ...errors import UserError
        raise UserError(f"{name}={mode!r} is not {what}; use one of {', '.join(modes)}",
                        "backend")
    return mode


def thread_mode_from_environment(environ=os.environ) -> str:
    return choice_from_environment("RANDYGPT_KERNEL_THREADS", THREAD_MODES, "a thread choice",
                                   environ)


class ThreadChoice:
    """How many threads each parallel kernel (jit.pjit) runs with: one, or all of numba's.

    numba's thread pool sleeps between kernels (threads.py: OMP_WAIT_POLICY=passive, so that
    it never spins beside OpenBLAS or another process), and waking it can cost more than a
    small kernel's work: in a 33-token prefill on an Intel Xeon (2 cores, KVM) an rmsnorm
    took 300 us on 2 threads. What a wake costs depends on the machine and on what ran
    before (a virtual CPU left idle for a while sleeps deeper), so it is measured on the
    real calls, where they run: the first TRIALS calls of a kernel at a size (its largest
    array, rounded up to a power of two) after a warm-up alternate one thread and all, and
    one thread is kept only where its fastest call took <= 90% of the fastest on all
    (near-ties keep all). Kernels over LARGE elements keep all threads untimed. Results do not depend on the thread count (parallel loops run over
    fixed chunks: jit.CHUNKS), so the trials change no result. Decisions share the
    kernel-decision file.

        RANDYGPT_KERNEL_THREADS=auto (default) | all | 1     force either
    """
    TRIALS = 6                  # timed calls per kernel and size: 3 on one thread, 3 on all
    LARGE = 1 << 17             # elements: from here all threads, untimed (training's sizes;
    #                             each kernel of configs A and B was 1.4-4.6x faster on 2)

    def __init__(self, mode: str | None = None, path: str | None = None):
        self.mode = thread_mode_from_environment() if mode is None else mode
        if self.mode not in THREAD_MODES:
            raise ValueError(f"thread mode {self.mode!r} is not one of {THREAD_MODES}")
        self.path = decision_file() if path is None else path
        self.decisions: dict[str, dict] = {}
        self.trials: dict[str, list] = {}               # key -> [(threads, seconds), ...]
        self.ran: dict[str, int] = {}                   # key -> threads, this process
        self._loaded = False
        self._lock = threading.Lock()

    def threads(self, kernel, args, all_threads: int) -> tuple[int, str | None]:
        """(the thread count to call `kernel(*args)` with, and the key to `observe` the
        call's time under, or None when decided)."""
        if all_threads <= 1 or self.mode == "1":
            return 1, None
        if self.mode == "all":
            return all_threads, None
        work = max((a.size for a in args if isinstance(a, np.ndarray)), default=1)
        if work >= self.LARGE:
            return all_threads, None
        key = (f"threads {kernel.__name__} size<={1 << max(0, work - 1).bit_length()} "
               f"of {all_threads}")
        decision = self.decisions.get(key)
        if decision is None:
            with self._lock:
                if not self._loaded:
                    self._loaded = True
                    self.decisions.update({k: v for k, v in read_decisions(self.path).items()
                                           if k.startswith("threads ") and isinstance(v, dict)
                                           and v.get("threads") in (1, all_threads)})
                decision = self.decisions.get(key)
        if decision is not None:
            self.ran[key] = decision["threads"]
            return decision["threads"], None
        done = len(self.trials.setdefault(key, []))
        return (1 if done % 2 else all_threads), key  # warm-up (compiles) on all, then 1, all

    def observe(self, key: str, threads: int, seconds: float) -> None:
        """A trial call's time; after the warm-up and TRIALS more, the decision."""
        with self._lock:
            trials = self.trials.setdefault(key, [])
            trials.append((threads, seconds))
            if len(trials) < 1 + self.TRIALS or key in self.decisions:
                return
            one = min(t for n, t in trials[1:] if n == 1)
            every = min(t for n, t in trials[1:] if n != 1)
            all_threads = max(n for n, _ in trials)
            decision = {"threads": 1 if one <= (1 - MARGIN) * every else all_threads,
                        "one_s": one, "all_s": every}
            self.decisions[key] = decision
            self.ran[key] = decision["threads"]
        save_decision(self.path, key, decision)

    def summary(self) -> list[str]:
        """One line per parallel kernel and size this process ran: its threads, the timings."""
        lines = []
        for key, n in sorted(self.ran.items()):
            d = self.decisions.get(key, {})
            times = f"  (1: {d['one_s'] * 1e6:.0f} us, all: {d['all_s'] * 1e6:.0f} us)" \
                if "one_s" in d else ""
            lines.append(f"{key}: {n}{times}")
        return lines


_THREAD_CHOICE: ThreadChoice | None = None


def thread_choice() -> ThreadChoice:
    """The process's ThreadChoice (numba's thread count is the process's, not a backend's)."""
    global _THREAD_CHOICE
    if _THREAD_CHOICE is None:
        _THREAD_CHOICE = ThreadChoice()
    return _THREAD_CHOICE
