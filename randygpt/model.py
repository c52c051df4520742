"""The GPT model, defined once: parameters in one flat buffer, one block forward, its backward.

    x = wte[idx] + wpe[:T]                                   # (B, T, C)
    for each block:
        x = x + dropout(attn_proj(attention(qkv(norm(x)))))
        x = x + dropout(mlp_proj(act(fc(norm(x)))))          # act: relu(.)^2 or GELU
    logits = lm_head(norm(x))                                # (B, T, V); tied: wte^T

The ModelConfig says which norm and activation (by op name) the blocks use, whether the four
linear layers of a block have biases, and whether the LM head is the token embedding's
transpose (GPT-2); the model composes the ops of one backend (ops/contract.py) and knows no
arithmetic of its own.
`block_forward` is the only description of a block: training runs it with dropout and keeps
its caches for `block_backward` (which calls the backward twins in exactly the reverse
order); generation runs the same function with a KV cache, over a whole prompt (`prefill`)
or one new position per stream (`decode`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .ops.contract import get_backend
from .ops.reference import array_module

NORM_PARAMS = {"rmsnorm": ("g",), "layernorm": ("g", "b")}   # by name, each of shape (C,)


def parameter_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor, in the order it sits in the flat buffer."""
    C, V = cfg.n_embd, cfg.vocab_size

    def norm(name):
        return [(f"{name}.{k}", (C,)) for k in NORM_PARAMS[cfg.norm]]

    def linear(name, n_in, n_out):       # the weight, then its bias "<name>.b" if any
        return [(name, (n_in, n_out))] + [(name + ".b", (n_out,))] * cfg.bias

    shapes = [("wte", (V, C)), ("wpe", (cfg.block_size, C))]
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        shapes += [*norm(h + "ln1"), *linear(h + "attn.qkv", C, 3 * C),
                   *linear(h + "attn.proj", C, C), *norm(h + "ln2"),
                   *linear(h + "mlp.fc", C, 4 * C), *linear(h + "mlp.proj", 4 * C, C)]
    return shapes + [*norm("ln_f")] + [("lm_head", (C, V))] * (not cfg.tied_head)


def count_parameters(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for _, s in parameter_shapes(cfg))


class FlatTensors:
    """One contiguous 1-D buffer with a named, shaped view onto each tensor in it."""

    def __init__(self, shapes, dtype, xp=np):
        self.shapes = list(shapes)
        self.offsets = {}
        n = 0
        for name, shape in self.shapes:
            self.offsets[name] = (n, n + math.prod(shape))
            n += math.prod(shape)
        self.flat = xp.zeros(n, dtype=dtype)
        self.views = {name: self.flat[a:b].reshape(shape)
                      for (name, shape), (a, b) in zip(self.shapes, self.offsets.values())}

    def __getitem__(self, name):
        return self.views[name]

    def names(self):
        return [name for name, _ in self.shapes]


@dataclass
class BlockCache:
    """What block_backward needs of one block_forward, one op cache per layer of the block."""
    ln1: object = None
    qkv: object = None
    attention: object = None
    attn_proj: object = None
    attn_dropout: object = None
    ln2: object = None
    fc: object = None
    act: object = None
    mlp_proj: object = None
    mlp_dropout: object = None


class GPT:
    def __init__(self, cfg: ModelConfig, seed: int | None = 0, dtype=np.float32,
                 backend="reference"):
        cfg.validate()
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.backend = get_backend(backend)
        self.ops = self.backend.ops
        self.xp = self.backend.xp            # where the buffers live (NumPy, or the GPU's)
        self.params = FlatTensors(parameter_shapes(cfg), self.dtype, self.xp)
        self._grads = None                   # allocated by the first backward (training only)
        self._cache = None
        if seed is not None:
            self.init_weights(np.random.default_rng(seed))

    def on_backend(self, backend) -> "GPT":
        """A model with these weights (copied) on another backend (a name or a Backend)."""
        other = GPT(self.cfg, seed=None, dtype=self.dtype, backend=backend)
        other.params.flat[...] = other.backend.to_device(self.backend.to_host(self.params.flat))
        return other

    @property
    def grads(self) -> FlatTensors:
        if self._grads is None:
            self._grads = FlatTensors(self.params.shapes, self.dtype, self.xp)
        return self._grads

    @property
    def num_params(self) -> int:
        return self.params.flat.size

    def init_weights(self, rng) -> None:
        # GPT-2 init: N(0, 0.02) for every matrix, residual output projections scaled by
        # 1/sqrt(2 n_layer) (two residual adds per block), norm gains 1, biases 0. Drawn in
        # float64 so a float32 and a float64 model from the same seed start from the same numbers.
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, shape in self.params.shapes:
            if name.endswith(".g"):
                self.params[name][...] = 1.0
            elif name.endswith(".b"):
                self.params[name][...] = 0.0
            else:
                std = resid_std if name.endswith("proj") else 0.02
                self.params[name][...] = self.xp.asarray(rng.standard_normal(shape) * std)

    def decay_mask(self):
        """1 for tensors that get weight decay (the matrices), 0 for norm gains and biases."""
        mask = np.zeros(self.num_params, dtype=self.dtype)
        for name, shape in self.params.shapes:
            if len(shape) == 2:
                a, b = self.params.offsets[name]
                mask[a:b] = 1.0
        return self.xp.asarray(mask)

    # ----------------------------------------------------------------------------------------
    # The layers of the description, each a forward with its backward beside it. A layer's
    # backward writes its parameter gradients into self.grads and returns the input gradient.

    def norm_forward(self, x, name):
        p = [self.params[f"{name}.{k}"] for k in NORM_PARAMS[self.cfg.norm]]
        return getattr(self.ops, self.cfg.norm + "_forward")(x, *p, self.cfg.norm_eps)

    def norm_backward(self, dout, cache, name):
        dx, *dp = getattr(self.ops, self.cfg.norm + "_backward")(dout, cache)
        for k, d in zip(NORM_PARAMS[self.cfg.norm], dp):
            self.grads[f"{name}.{k}"][...] = d
        return dx

    def linear_forward(self, x, name):
        if self.cfg.bias:
            return self.ops.linear_bias_forward(x, self.params[name], self.params[name + ".b"])
        return self.ops.linear_forward(x, self.params[name])

    def linear_backward(self, dout, cache, name):
        if self.cfg.bias:
            dx, self.grads[name][...], self.grads[name + ".b"][...] = \
                self.ops.linear_bias_backward(dout, cache)
            return dx
        dx, self.grads[name][...] = self.ops.linear_backward(dout, cache)
        return dx

    def lm_head_forward(self, xf):
        # xf (..., C) -> logits (..., V): lm_head, or wte^T when the head is tied (no bias)
        w = self.params["wte"].T if self.cfg.tied_head else self.params["lm_head"]
        return self.ops.linear_forward(xf, w)

    def lm_head_backward(self, dlogits, cache):
        # tied: wte's gradient is this use's (dW^T) plus the embedding's, added by backward()
        dxf, dw = self.ops.linear_backward(dlogits, cache)                     # dw (C, V)
        if self.cfg.tied_head:
            self.grads["wte"][...] = dw.T
        else:
            self.grads["lm_head"][...] = dw
        return dxf

    def act_forward(self, x):
        return getattr(self.ops, self.cfg.activation + "_forward")(x)

    def act_backward(self, dout, cache):
        return getattr(self.ops, self.cfg.activation + "_backward")(dout, cache)[0]

    # ----------------------------------------------------------------------------------------
    def block_forward(self, x, i, drop=0.0, rng=None, kv=None, row0=0):
        """x (B, T, C) -> block i's output (B, T, C), and its BlockCache. `kv`: generation's
        attention over a KV cache (KVCache.prefill_view / decode_view) instead of training's.
        `row0`: x is rows row0.. of a bigger batch (their dropout masks are those rows')."""
        ops, h, c = self.ops, f"h.{i}.", BlockCache()
        # attention half: x1 = x + dropout(proj(attention(qkv(norm(x)))))
        xn1, c.ln1 = self.norm_forward(x, h + "ln1")                           # (B, T, C)
        qkv, c.qkv = self.linear_forward(xn1, h + "attn.qkv")                  # (B, T, 3C)
        if kv is None:
            y, c.attention = ops.attention_forward(qkv, self.cfg.n_head)       # (B, T, C)
        else:
            y = kv.attend(ops, i, qkv)
        a, c.attn_proj = self.linear_forward(y, h + "attn.proj")               # (B, T, C)
        x1, c.attn_dropout = ops.residual_dropout_forward(x, a, drop, rng, row0)  # x + dropout(a)
        # MLP half: x2 = x1 + dropout(proj(act(fc(norm(x1)))))
        xn2, c.ln2 = self.norm_forward(x1, h + "ln2")                          # (B, T, C)
        hid, c.fc = self.linear_forward(xn2, h + "mlp.fc")                     # (B, T, 4C)
        act, c.act = self.act_forward(hid)                                     # (B, T, 4C)
        m, c.mlp_proj = self.linear_forward(act, h + "mlp.proj")               # (B, T, C)
        x2, c.mlp_dropout = ops.residual_dropout_forward(x1, m, drop, rng, row0)  # x1 + dropout(m)
        return x2, c

    def block_backward(self, dx2, i, c: BlockCache):
        ops, h = self.ops, f"h.{i}."
        # MLP half, in reverse (`del`: each gradient is freed once used, which keeps backward's
        # peak memory ~7% lower on the 256-dim config: big (B, T, 4C) arrays never pile up)
        dx1, dm = ops.residual_dropout_backward(dx2, c.mlp_dropout)
        dact = self.linear_backward(dm, c.mlp_proj, h + "mlp.proj")
        del dm
        dhid = self.act_backward(dact, c.act)
        del dact
        dxn2 = self.linear_backward(dhid, c.fc, h + "mlp.fc")
        del dhid
        dx1_ln = self.norm_backward(dxn2, c.ln2, h + "ln2")
        del dxn2
        dx1 = dx1 + dx1_ln                     # x1 feeds both the residual and the norm
        del dx1_ln
        # attention half, in reverse
        dx, da = ops.residual_dropout_backward(dx1, c.attn_dropout)
        dy = self.linear_backward(da, c.attn_proj, h + "attn.proj")
        del da
        dqkv, = ops.attention_backward(dy, c.attention)
        del dy
        dxn1 = self.linear_backward(dqkv, c.qkv, h + "attn.qkv")
        del dqkv
        return dx + self.norm_backward(dxn1, c.ln1, h + "ln1")

    # ----------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, rng=None, row0=0):
        """idx (B, T) ints -> logits (B, T, V), and the mean loss when targets are given.

        `rng` drives dropout; None means evaluation (no dropout); `row0`: idx is rows row0..
        of a bigger batch (a micro-batch, a rank's share). The activations needed by
        `backward` are kept only when targets are given.
        """
        cfg, ops = self.cfg, self.ops
        if idx.shape[1] > cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size "
                             f"{cfg.block_size}")
        drop = cfg.dropout if rng is not None else 0.0
        idx = self.xp.asarray(idx)           # a no-op where the batch is already there
        x, emb = ops.embedding_forward(self.params["wte"], self.params["wpe"], idx)  # (B,T,C)
        blocks = []
        for i in range(cfg.n_layer):
            x, cache = self.block_forward(x, i, drop, rng, row0=row0)
            blocks.append(cache)
        xf, lnf = self.norm_forward(x, "ln_f")                                 # (B, T, C)
        logits, head = self.lm_head_forward(xf)                                # (B, T, V)
        if targets is None:
            self._cache = None
            return logits, None
        loss, ce = ops.cross_entropy_forward(logits, self.xp.asarray(targets))
        self._cache = (emb, blocks, lnf, head, ce)
        # on a GPU the loss stays a 0-d device array: converting it would wait for the GPU
        return logits, float(loss) if self.xp is np else loss

    def backward(self, dloss=1.0):
        """Gradient of dloss x the last forward's mean loss w.r.t. every parameter, into
        self.grads (dloss: a micro-batch's share of the step's targets)."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() with targets first")
        emb, blocks, lnf, head, ce = self._cache
        g = self.grads
        dlogits, = self.ops.cross_entropy_backward(dloss, ce)                    # (B, T, V)
        dxf = self.lm_head_backward(dlogits, head)
        dx = self.norm_backward(dxf, lnf, "ln_f")
        for i in reversed(range(self.cfg.n_layer)):
            dx = self.block_backward(dx, i, blocks[i])
        _, dwte, g["wpe"][...] = self.ops.embedding_backward(dx, emb)
        if self.cfg.tied_head:
            g["wte"][...] += dwte              # wte's second use: the head's gradient is there
        else:
            g["wte"][...] = dwte
        self._cache = None

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without keeping activations (evaluation)."""
        _, loss = self.forward(idx, targets)
        self._cache = None
        return loss

    # ----------------------------------------------------------------------------------------
    # Generation: the same blocks, with keys and values kept in a KVCache. Positions are
    # absolute (wpe), so a stream's cache holds positions 0..block_size-1 of one window; the
    # caller slides the window by prefilling again (see session.py).

    def prefill(self, ids, cache: "KVCache", stream: int = 0):
        """ids (T,) at positions 0..T-1 of `stream` -> logits (T, V); that stream's cache
        restarts and holds T positions. Attention is training's, so the logits are forward's
        for this window."""
        ids = self.xp.asarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))  # (1, T)
        T = ids.shape[1]
        if not 1 <= T <= self.cfg.block_size:
            raise ValueError(f"prefill needs 1..{self.cfg.block_size} tokens, got {T}")
        x, _ = self.ops.embedding_forward(self.params["wte"], self.params["wpe"], ids)
        view = cache.prefill_view(stream, T)
        for i in range(self.cfg.n_layer):
            x, _ = self.block_forward(x, i, kv=view)
        cache.lengths[stream] = T
        return self.backend.to_host(self.head_forward(x)[0])                   # (T, V)

    def decode(self, tokens, cache: "KVCache", streams, positions=None):
        """One row per new token: tokens (R,) of streams (R,) at positions (R,) -> logits
        (R, V) for the position after each. By default each stream has one row, at its
        cache's length. A stream may also have several rows, at consecutive positions in
        order, starting at its length or at 0 (its window restarts: a slid window joins the
        same step as other streams' next tokens); each row attends to its stream's cache up
        to itself, so the rows before it in this call are its context."""
        streams = np.asarray(streams, dtype=np.int64)
        pos = cache.lengths[streams] if positions is None else np.asarray(positions, np.int64)
        one_each = positions is None or (len(set(streams.tolist())) == len(streams)
                                         and (pos == cache.lengths[streams]).all())
        groups = None if one_each else _row_groups(streams, pos, cache.lengths)
        if (pos >= self.cfg.block_size).any():
            raise ValueError(f"a KV cache is full ({self.cfg.block_size} positions): restart "
                             "the window, its most recent tokens again from position 0")
        step = self._decode_step()
        if step is not None and step.ready(self.dtype):   # the fused backend: the same blocks,
            logits = step(self.params.flat, tokens, pos, streams, cache)   # one compiled call
        else:
            started = time.perf_counter()
            logits = self._decode_op_by_op(np.asarray(tokens), cache, streams, pos, groups)
            if step is not None:      # op-by-op time counts toward compiling the step
                step.charge(time.perf_counter() - started)
        if one_each:
            cache.lengths[streams] = pos + 1
        else:
            for s, rows in groups.items():
                cache.lengths[s] = pos[rows[-1]] + 1
        return logits

    def _decode_op_by_op(self, tokens, cache, streams, pos, groups):
        """decode's math with the backend's ops: a restarting stream's rows are a prefill,
        the other rows run in waves of one row per stream (one batched step each)."""
        if groups is None:
            return self._decode_rows(tokens, cache, streams, pos)
        out = np.empty((len(tokens), self.cfg.vocab_size), dtype=self.dtype)
        waves = {}
        for s, rows in groups.items():
            if pos[rows[0]] == 0 and len(rows) > 1:
                out[rows] = self.prefill(tokens[rows], cache, s)
            else:
                for i, row in enumerate(rows):
                    waves.setdefault(i, []).append(row)
        for rows in waves.values():
            r = np.asarray(rows)
            out[r] = self._decode_rows(tokens[r], cache, streams[r], pos[r])
        return out

    def _decode_rows(self, tokens, cache, streams, pos):
        # the embedding of one position per stream: wte[token] + wpe[position]. Rows are
        # streams: (S, C) runs the same per-position ops as (B, T, C), as 2-D products.
        xp = self.xp                                                           # (S, C):
        x = self.params["wte"][xp.asarray(tokens)] + self.params["wpe"][xp.asarray(pos)]
        view = cache.decode_view(streams, pos)
        for i in range(self.cfg.n_layer):
            x, _ = self.block_forward(x, i, kv=view)
        return self.backend.to_host(self.head_forward(x))                      # (S, V)

    def compile_decode(self) -> bool:
        """Make decode use the backend's compiled step (if it has one) from the next call,
        compiling it there where numba's disk cache lacks it; True if it has to compile."""
        step = self._decode_step()
        if step is None:
            return False
        step.compile_now()
        return not step.in_disk_cache(self.dtype)

    def _decode_step(self):
        # a backend may compile decode from these blocks (fused: ops/fused/decode.py); traced
        # once per model, None where the backend has no such step or lacks a kernel
        if not hasattr(self, "_step"):
            trace = self.backend.options.get("decode_step")
            self._step = trace(self) if trace is not None else None
        return self._step

    def head_forward(self, x):
        """x (..., C) -> logits (..., V): the final norm and the LM head."""
        xf, _ = self.norm_forward(x, "ln_f")
        return self.lm_head_forward(xf)[0]


def _row_groups(streams, positions, lengths) -> dict:
    """{stream: its rows, in order} for GPT.decode, checking that each stream's rows are at
    consecutive positions from its cache's length, or from 0 (a restart)."""
    groups = {}
    for row, s in enumerate(streams.tolist()):
        groups.setdefault(s, []).append(row)
    for s, rows in groups.items():
        first = int(positions[rows[0]])
        if first not in (0, int(lengths[s])) or \
                (positions[rows] != np.arange(first, first + len(rows))).any():
            raise ValueError(f"stream {s}'s rows are at positions {positions[rows].tolist()}: "
                             f"they must be consecutive from its length {int(lengths[s])} "
                             "or from 0")
    return groups


class KVCache:
    """Keys and values of every layer for `streams` independent streams: stream s holds
    positions 0..lengths[s]-1. Shapes (L, S, H, block_size, hs)."""

    def __init__(self, cfg: ModelConfig, streams: int = 1, dtype=np.float32, xp=np):
        hs = cfg.n_embd // cfg.n_head
        self.k = xp.zeros((cfg.n_layer, streams, cfg.n_head, cfg.block_size, hs), dtype=dtype)
        self.v = xp.zeros_like(self.k)
        self.lengths = np.zeros(streams, dtype=np.int64)     # on the host: loops read it
        self.n_head = cfg.n_head

    @property
    def streams(self) -> int:
        return self.k.shape[1]

    def _split(self, qkv):
        # qkv (S, T, 3C) -> q, k, v each (S, H, T, hs)
        S, T, C3 = qkv.shape
        C = C3 // 3
        return [qkv[:, :, i * C:(i + 1) * C].reshape(S, T, self.n_head, -1).transpose(0, 2, 1, 3)
                for i in range(3)]

    def prefill_view(self, stream: int, T: int):
        return _PrefillAttention(self, stream, T)

    def decode_view(self, streams, positions):
        return _DecodeAttention(self, streams, positions)


class _PrefillAttention:
    """Attention for a prompt of T tokens in one stream: training's causal attention over
    the prompt, keeping its keys and values at positions 0..T-1."""

    def __init__(self, cache, stream, T):
        self.cache, self.stream, self.T = cache, stream, T

    def attend(self, ops, layer, qkv):
        _, k, v = self.cache._split(qkv)                                       # (1, H, T, hs)
        self.cache.k[layer, self.stream, :, :self.T] = k[0]
        self.cache.v[layer, self.stream, :, :self.T] = v[0]
        return ops.attention_forward(qkv, self.cache.n_head)[0]                # (1, T, C)


class _DecodeAttention:
    """Attention of one new position per stream over that stream's cache (itself included)."""

    def __init__(self, cache, streams, positions):
        self.cache, self.positions = cache, positions
        S = len(streams)
        contiguous = S and (streams == np.arange(streams[0], streams[0] + S)).all()
        xp = array_module(cache.k)                       # index arrays where the cache is
        self.streams = (slice(int(streams[0]), int(streams[0]) + S) if contiguous
                        else xp.asarray(streams))
        self.rows, self.at = xp.arange(S), xp.asarray(positions)
        self.n_seen = int(positions.max()) + 1 if S else 0

    def attend(self, ops, layer, qkv):
        S, C3 = qkv.shape                                                      # (S, 3C)
        C, H = C3 // 3, self.cache.n_head
        q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(S, H, -1) for i in range(3))  # (S, H, hs)
        keys, values = self.cache.k[layer, self.streams], self.cache.v[layer, self.streams]
        keys[self.rows, :, self.at] = k
        values[self.rows, :, self.at] = v
        if not isinstance(self.streams, slice):          # fancy indexing copied: write back
            self.cache.k[layer, self.streams] = keys
            self.cache.v[layer, self.streams] = values
        n = self.n_seen                                  # no stream sees past this position
        return ops.kv_attention_forward(q, keys[:, :, :n], values[:, :, :n],
                                        self.positions + 1)                    # (S, C)
