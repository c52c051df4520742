"""One compiled decode step, traced from the model's own block description.

Decoding one token per stream runs ~70 ops on arrays of one row per stream; as NumPy calls
their overhead, not the ~2.4 MFLOP of arithmetic, is the cost. So the fused backend turns
the step into one numba call. It does not restate the architecture: `trace(model)` runs
GPT.block_forward and GPT.head_forward themselves with symbolic activations in place of
arrays and a recorder in place of the ops, which yields the program the description
implies, e.g. for each block

    NORM x -> a (ln1.g) ; MATMUL a -> b (attn.qkv) ; ATTEND b -> c (layer i) ;
    MATMUL c -> d (attn.proj) ; ADD x, d -> e ; NORM e -> f ; MATMUL f -> g ; ACT g -> h ; ...

and `_run` executes it over a buffer of slots (a row of them per decoded row). A description that
uses an op the recorder has no kernel for (a new norm, an activation, dropout at decode)
yields no program, and decode runs op by op as before, correct and slower.

A row is one (stream, position): usually each stream's next token, but a stream whose window
restarts brings rows at positions 0..keep, in order, each attending to the ones before it.
Products run in register blocks of 4 rows x 16 or 64 outputs (or 1 x 64), summing k in
order whatever the block (so a stream's logits are bit-identical alone or batched with
others); attention is the reference kv_attention_forward's math for each (row, head),
reading and writing the model's KVCache. Whole streams can go to different threads (_run
holds no GIL). The block width and the thread count are timed per batch size on this
machine (DecodeStep.setting); no choice changes a bit. Tested against the op-by-op decode
and full forward passes (tests/test_generate.py).
"""
from __future__ import annotations

import copy
import math
import os

import numba
import numpy as np
from numba import njit

from .choose import choice_from_environment, thread_mode_from_environment
from .jit import FASTMATH, on_disk, stack_block

NORM, MATMUL, ACT, ADD, ATTEND = range(5)
_FIELDS = 8            # opcode, in a, in b, out, parameter offset, width in, width out, layer
_COLS4, _COLS1 = 16, 64  # a product's register block: 4 rows x 16 outputs, or 1 row x 64
_block = stack_block(4 * _COLS1)

# The 4-row block's width is the machine's choice: 4 x 16 fits AVX2's 16 ymm registers, 4 x
# 64 (16 sums of 16 lanes) only AVX-512's 32 zmm. On an Intel Xeon (family 6 model 167) the
# small preset's products for 32 rows took 2.1 ms with 4 x 16 and 1.2 ms with 4 x 64, as
# long as OpenBLAS's; 4 x 32 and 8 x 16 came out of LLVM 10x slower. Either width sums k in
# the same order, so the choice changes no logit; it is timed on the first real steps at
# each batch size (rounded up to a power of two) and kept in the kernel-decision file
# (choose.py); benchmarks/bench_generate.py prints the timings.
BLOCK_WIDTHS = (_COLS4, _COLS1)
BLOCK_MODES = ("auto",) + tuple(str(w) for w in BLOCK_WIDTHS)


def block_mode_from_environment(environ=os.environ) -> str:
    """RANDYGPT_DECODE_BLOCK=auto (default) | 16 | 64: the 4-row product block's width."""
    return choice_from_environment("RANDYGPT_DECODE_BLOCK", BLOCK_MODES, "a block width",
                                   environ)


class Untraceable(Exception):
    """The description uses something the compiled step has no kernel for."""


class _Activation:
    """A symbolic (S, width) activation: one slot of the step's buffer."""
    def __init__(self, slot, width):
        self.slot, self.width = slot, width


class _Recorder:
    """Stands in for a backend's ops while block_forward runs: records, computes nothing."""

    def __init__(self, flat):
        self.flat, self.program, self.widths, self.eps = flat, [], [], None

    def new(self, width):
        self.widths.append(width)
        return _Activation(len(self.widths) - 1, width)

    def offset(self, param):
        # where a parameter view starts in the model's flat buffer
        start = (param.__array_interface__["data"][0]
                 - self.flat.__array_interface__["data"][0]) // self.flat.itemsize
        if not (param.flags.c_contiguous and 0 <= start < self.flat.size):
            raise Untraceable("a parameter outside the flat buffer")
        return int(start)

    def emit(self, op, a, b, width_out, param=-1, layer=-1):
        out = self.new(width_out)
        self.program.append((op, a.slot, -1 if b is None else b.slot, out.slot, param,
                             a.width, width_out, layer))
        return out, None

    def rmsnorm_forward(self, x, g, eps):
        if self.eps not in (None, eps):
            raise Untraceable("norms with different eps")
        self.eps = eps
        return self.emit(NORM, x, None, x.width, self.offset(g))

    def linear_forward(self, x, w):
        if w.shape[0] != x.width:
            raise Untraceable("a product of mismatched width")
        return self.emit(MATMUL, x, None, w.shape[1], self.offset(w))

    def squared_relu_forward(self, x):
        return self.emit(ACT, x, None, x.width)

    def residual_dropout_forward(self, x, fx, p, rng, row0=0):
        if p:
            raise Untraceable("dropout at decode")
        return self.emit(ADD, x, fx, x.width)

    def __getattr__(self, name):
        raise Untraceable(name)


class _RecordedAttention:
    def attend(self, ops, layer, qkv):
        return ops.emit(ATTEND, qkv, None, qkv.width // 3, layer=layer)[0]


# Compiling _run takes ~6 s (5.7 s measured on an Intel Xeon) and saves ~1 ms a token, so a
# short sample (300 tokens at the end of a first training run) is faster op by op. GPT.decode
# therefore runs op by op until that has taken COMPILE_AFTER_S seconds, then compiles: the
# ski-rental rule, never more than twice the time of the better choice in hindsight. A step
# numba's disk cache already holds (any later run) is used from the first token.
COMPILE_AFTER_S = 6.0

# Rows per _run call. A call holds every activation of its rows (~14k values a row for the
# small preset), and a window restart brings keep + 1 rows a stream (33 x 32 streams at
# once in a benchmark's lock-step), so longer calls are split. Rows run in order either
# way: a later call's rows see the keys and values the earlier ones wrote, as in one call.
MAX_ROWS = 64
MIN_SPLIT = 8           # rows from which the step is also timed on every thread


class DecodeStep:
    """`step(flat, tokens, positions, streams, cache)` -> logits (S, V): GPT.decode's math."""

    def __init__(self, program, widths, eps, wte, wpe, out_slot, n_head):
        self.program = np.asarray(program, dtype=np.int64).reshape(-1, _FIELDS)
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.eps, self.wte, self.wpe, self.out_slot, self.n_head = eps, wte, wpe, out_slot, n_head
        self._buffers, self._threads = {}, None
        self.block_mode = block_mode_from_environment()
        self.thread_mode = thread_mode_from_environment()
        self.chosen: dict[tuple, tuple] = {}    # (rows: a power of two, split) -> setting
        self._setting_of: dict[tuple, tuple] = {}   # (rows, split) -> (width, threads)
        self.op_by_op_s = 0.0               # time GPT.decode spent op by op, waiting for this
        self._on_disk = {}                  # dtype name -> numba's disk cache has _run
        self._ready = set()                 # dtypes ready() said yes to

    def ready(self, dtype) -> bool:
        """Whether GPT.decode should call the step now: compiled in this process, on disk,
        or the op-by-op decode has already taken as long as compiling would."""
        if dtype in self._ready:                            # the hot path: every token
            return True
        name = np.dtype(dtype).name
        ready = (self.in_disk_cache(dtype) or self.op_by_op_s >= COMPILE_AFTER_S
                 or any(name in str(sig) for sig in _run.signatures))
        if ready:                                           # once ready, always
            self._ready.add(dtype)
        return ready

    def charge(self, seconds: float) -> None:
        self.op_by_op_s += seconds

    def compile_now(self) -> None:
        """Use the step from the next call on, compiling it there if need be (a server,
        which would rather compile at start than during a client's tokens)."""
        self.op_by_op_s = max(self.op_by_op_s, COMPILE_AFTER_S)

    def in_disk_cache(self, dtype) -> bool:
        """Whether numba's disk cache holds the step for dtype (a first call loads it)."""
        name = np.dtype(dtype).name
        if name not in self._on_disk:                       # read numba's index once
            self._on_disk[name] = on_disk(_run, name)
        return self._on_disk[name]

    def __call__(self, flat, tokens, positions, streams, cache):
        tokens, positions, streams = (np.asarray(a, np.int64)
                                      for a in (tokens, positions, streams))
        a, b = self.offsets[self.out_slot], self.offsets[self.out_slot + 1]
        logits = np.empty((len(tokens), b - a), dtype=flat.dtype)              # (R, V)

        def run(rows, width, threads):      # the step over rows[0:rows] with one setting
            parts = _parts(streams[:rows], threads) if threads > 1 else [slice(0, rows)]
            jobs = [self._pool().submit(self._run_rows, flat, tokens, positions, streams,
                                        cache, logits, part, k, width)
                    for k, part in enumerate(parts) if k]
            self._run_rows(flat, tokens, positions, streams, cache, logits, parts[0], 0, width)
            for job in jobs:
                job.result()
        R = len(tokens)            # can the rows split? (one restarting stream cannot)
        split = R >= MIN_SPLIT and bool(
            (streams[:numba.config.NUMBA_NUM_THREADS * MAX_ROWS] != streams[0]).any())
        run(R, *self.setting(R, run, split))
        return logits

    def _run_rows(self, flat, tokens, positions, streams, cache, logits, part, k, width):
        """_run over the rows `part` (whole streams, in order: an index array, or a slice)
        in calls of at most MAX_ROWS rows, on buffer k; their logits into logits[part]."""
        a, b = self.offsets[self.out_slot], self.offsets[self.out_slot + 1]
        if isinstance(part, slice):                     # contiguous rows: views, not copies
            start, stop, _ = part.indices(len(tokens))
            calls = [slice(r, min(r + MAX_ROWS, stop)) for r in range(start, stop, MAX_ROWS)]
        else:
            calls = [part[r:r + MAX_ROWS] for r in range(0, len(part), MAX_ROWS)]
        for rows in calls:
            ids = tokens[rows]
            buf = self._buffer(k, len(ids), flat.dtype)
            _run(self.program, self.offsets, buf, flat, self.wte, self.wpe, ids,
                 positions[rows], streams[rows], cache.k, cache.v, self.n_head,
                 flat.dtype.type(self.eps), width)
            logits[rows] = buf[:, a:b]

    def _buffer(self, k, n, dtype):
        # a buffer of MAX_ROWS rows per thread and dtype, reused call to call: rows x slots
        if (k, dtype) not in self._buffers:
            self._buffers[k, dtype] = np.empty((MAX_ROWS, int(self.offsets[-1])), dtype=dtype)
        return self._buffers[k, dtype][:n]

    def _pool(self):
        if self._threads is None:
            from concurrent.futures import ThreadPoolExecutor
            self._threads = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                               thread_name_prefix="randygpt-decode-step")
        return self._threads

    def setting(self, R, run, split=True) -> tuple[int, int]:
        """(block width, threads) for a step of R rows: forced by the environment, decided
        before, or timed now by `run(rows, width, threads)` on the first rows of this step
        (up to the most rows the threads take in one call each). Running rows again
        recomputes them and rewrites the same keys and values (each row reads only its own
        stream's earlier positions), so timing changes nothing. A candidate replaces the
        one before it only when MARGIN faster. split: whether those rows hold more than one
        stream (else more threads are not a candidate, and the decision is kept apart)."""
        if (R, split) in self._setting_of:           # the hot path: one lookup
            return self._setting_of[R, split]
        from .choose import MARGIN, _best_times, decision_file, read_decisions, save_decision
        every = numba.config.NUMBA_NUM_THREADS
        widths = BLOCK_WIDTHS if self.block_mode == "auto" else (int(self.block_mode),)
        if R < 4:                                    # no 4-row block: the width is unused
            widths = widths[:1]
        threads = {"1": (1,), "all": (every,)}.get(
            self.thread_mode, (1, every) if split and R >= MIN_SPLIT else (1,))
        candidates = list(dict.fromkeys((w, t) for t in threads for w in widths))
        if len(candidates) == 1:
            self._setting_of[R, split] = candidates[0]
            return candidates[0]
        rows = min(1 << (R - 1).bit_length(), every * MAX_ROWS)
        chosen = self.chosen.get((rows, split))
        if chosen is None:
            key = f"decode rows<={rows} of {every} threads" + ("" if split else ", one stream")
            decision = read_decisions(decision_file()).get(key)
            if not (isinstance(decision, dict) and
                    (decision.get("width"), decision.get("threads")) in candidates):
                n = min(R, rows)
                times = _best_times([lambda c=c: run(n, *c) for c in candidates])
                best = 0
                for i in range(1, len(candidates)):
                    if times[i] <= (1 - MARGIN) * times[best]:
                        best = i
                decision = {"width": candidates[best][0], "threads": candidates[best][1],
                            "seconds": {f"4x{w} on {t}": round(x, 6)
                                        for (w, t), x in zip(candidates, times)}}
                save_decision(decision_file(), key, decision)
            chosen = self.chosen[rows, split] = (decision["width"], decision["threads"])
        self._setting_of[R, split] = chosen
        return chosen


def _parts(streams, n) -> list:
    """Row indices for n threads, each a set of whole streams (a stream's rows depend on one
    another) with about equal row counts; each part's rows in their order."""
    rows = np.arange(len(streams))
    _, first, inverse, counts = np.unique(streams, return_index=True, return_inverse=True,
                                          return_counts=True)
    part_of = np.empty(len(counts), dtype=np.int64)
    done = 0
    for i in np.argsort(first):                      # streams in the order they first come
        part_of[i] = min(n - 1, done * n // len(streams))
        done += counts[i]
    row_part = part_of[inverse.reshape(-1)]
    return [p for p in (rows[row_part == k] for k in range(n)) if len(p)]


def trace(model) -> DecodeStep | None:
    """The compiled decode step of `model`'s description, or None where it has no kernel."""
    from ...model import GPT
    rec = _Recorder(model.params.flat)
    proxy = copy.copy(model)
    proxy.ops = rec
    try:
        x = rec.new(model.cfg.n_embd)                       # slot 0: wte[token] + wpe[pos]
        for i in range(model.cfg.n_layer):
            x, _ = GPT.block_forward(proxy, x, i, kv=_RecordedAttention())
        logits = GPT.head_forward(proxy, x)
    except Untraceable:
        return None
    return DecodeStep(rec.program, rec.widths, rec.eps if rec.eps is not None else 0.0,
                      rec.offset(model.params["wte"]), rec.offset(model.params["wpe"]),
                      logits.slot, model.cfg.n_head)


@njit(fastmath={"contract"}, error_model="numpy")
def _product_block(buf, s0, nr, a0, o0, W, j0, nc):
    """buf[s0 + r, o0 + j0 + j] = sum_k buf[s0 + r, a0 + k] * W[k, j0 + j], r < nr (4 or 1),
    j < nc: a block of sums held in registers while k runs in order 0, 1, ... Every output
    is one chain of fused multiply-adds in k order whatever the block's shape, so a stream's
    logits do not depend on how many streams share a step. 4 rows x 16 fits AVX2's 16 ymm
    registers (8 sums, 2 of W, 1 broadcast; 4 x 32 needed all 16 for the sums alone), 4 x
    64 AVX-512's 32 zmm (BLOCK_WIDTHS), and 1 row x 64 gives 8 independent FMA chains
    instead of 4, to cover the FMA latency."""
    acc = numba.carray(_block(buf.dtype), (4, _COLS1))
    K = W.shape[0]
    # each shape is written out: constant trip counts unroll and keep the sums in registers
    # (the same loops as a function made per shape and called from here were 3-12x slower:
    # LLVM did not inline them, and the sums went to memory)
    if nr == 4 and nc == _COLS4:
        for r in range(4):
            for j in range(_COLS4):
                acc[r, j] = 0
        for k in range(K):
            w_row = W[k, j0:j0 + _COLS4]
            for r in range(4):
                x = buf[s0 + r, a0 + k]
                for j in range(_COLS4):
                    acc[r, j] += x * w_row[j]
    elif nr == 4 and nc == _COLS1:
        for r in range(4):
            for j in range(_COLS1):
                acc[r, j] = 0
        for k in range(K):
            w_row = W[k, j0:j0 + _COLS1]
            for r in range(4):
                x = buf[s0 + r, a0 + k]
                for j in range(_COLS1):
                    acc[r, j] += x * w_row[j]
    elif nr == 1 and nc == _COLS1:
        for j in range(_COLS1):
            acc[0, j] = 0
        for k in range(K):
            w_row = W[k, j0:j0 + _COLS1]
            x = buf[s0, a0 + k]
            for j in range(_COLS1):
                acc[0, j] += x * w_row[j]
    else:                                                   # the last columns
        for r in range(nr):
            for j in range(nc):
                acc[r, j] = 0
        for k in range(K):
            for r in range(nr):
                x = buf[s0 + r, a0 + k]
                for j in range(nc):
                    acc[r, j] += x * W[k, j0 + j]
    for r in range(nr):
        for j in range(nc):
            buf[s0 + r, o0 + j0 + j] = acc[r, j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def _run(program, offsets, buf, flat, wte, wpe, tokens, positions, streams, kc, vc, n_head,
         eps, width):
    S = buf.shape[0]
    C = offsets[1]
    zero = eps - eps                                        # 0 in the model's dtype
    for s in range(S):                                      # the embedding
        t, p = tokens[s], positions[s]
        for c in range(C):
            buf[s, c] = flat[wte + t * C + c] + flat[wpe + p * C + c]
    for n in range(program.shape[0]):
        op, a, b, o, w, d_in, d_out, layer = program[n]
        a0, o0 = offsets[a], offsets[o]
        if op == NORM:
            for s in range(S):
                ss = zero
                for c in range(d_in):
                    ss += buf[s, a0 + c] * buf[s, a0 + c]
                r = 1 / math.sqrt(ss / d_in + eps)
                for c in range(d_in):
                    buf[s, o0 + c] = buf[s, a0 + c] * r * flat[w + c]
        elif op == MATMUL:
            W = flat[w:w + d_in * d_out].reshape(d_in, d_out)
            S4 = S - S % 4
            for j0 in range(0, d_out, width):   # a strip of W's columns, then every block of
                for s0 in range(0, S4, 4):      # 4 rows over it while it is in cache: W is
                    _product_block(buf, s0, 4, a0, o0, W, j0,   # read from memory once a step
                                   min(width, d_out - j0))
            for s0 in range(S4, S):             # the last rows one at a time
                for j0 in range(0, d_out, _COLS1):
                    _product_block(buf, s0, 1, a0, o0, W, j0, min(_COLS1, d_out - j0))
        elif op == ACT:
            for s in range(S):
                for c in range(d_in):
                    r = max(buf[s, a0 + c], zero)
                    buf[s, o0 + c] = r * r
        elif op == ADD:
            b0 = offsets[b]
            for s in range(S):
                for c in range(d_in):
                    buf[s, o0 + c] = buf[s, a0 + c] + buf[s, b0 + c]
        else:                                               # ATTEND over the KV cache
            hs = d_out // n_head
            for s in range(S):
                _attend(buf[s], a0, o0, kc[layer, streams[s]], vc[layer, streams[s]],
                        positions[s], n_head, hs, zero)


@njit(fastmath=FASTMATH, error_model="numpy")
def _attend(row, a0, o0, kc, vc, p, n_head, hs, zero):
    """One stream's attention at position p, head by head: its k and v go into the cache
    (kc, vc: (H, T, hs), that stream's rows of one layer), then softmax(q k^T / sqrt(hs)) v
    over positions 0..p. The cache rows come as 2-D views, so the loops index plain (T, hs)
    arrays rather than the 5-D cache (indexed in place, attention took more time than all
    the products: 4.5 of 8.2 ms for 32 streams at position 40)."""
    Cq = n_head * hs
    scale = 1 / math.sqrt(hs)
    scores = np.empty(p + 1, dtype=row.dtype)
    acc = np.empty(hs, dtype=row.dtype)
    for h in range(n_head):
        q = row[a0 + h * hs:a0 + (h + 1) * hs]
        K, V = kc[h], vc[h]                                 # (T, hs)
        for d in range(hs):               # element loops: a slice assignment compiles numba's
            K[p, d] = row[a0 + Cq + h * hs + d]          # shape-error messages (~4 s cold)
            V[p, d] = row[a0 + 2 * Cq + h * hs + d]
        top = -np.inf
        for t in range(p + 1):
            dot = zero
            for d in range(hs):
                dot += q[d] * K[t, d]
            scores[t] = dot * scale
            top = max(top, scores[t])
        total = zero
        for t in range(p + 1):
            scores[t] = math.exp(scores[t] - top)
            total += scores[t]
        for d in range(hs):
            acc[d] = zero
        for t in range(p + 1):
            wt = scores[t] / total
            for d in range(hs):
                acc[d] += wt * V[t, d]
        for d in range(hs):
            row[o0 + h * hs + d] = acc[d]
