"""The GPT model: parameters in one flat buffer, a forward pass and its exact backward.

    x = wte[idx] + wpe[:T]                                   # (B, T, C)
    for each block:
        x = x + dropout(attn_proj(attention(qkv(rmsnorm(x)))))
        x = x + dropout(mlp_proj(relu(fc(rmsnorm(x)))^2))
    logits = lm_head(rmsnorm(x))                             # (B, T, V)

The model composes the layer functions of an ops module (the readable reference by default);
`backward` calls their backward twins in exactly the reverse order of `forward`.
"""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .ops import reference


def parameter_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor, in the order it sits in the flat buffer."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = [("wte", (V, C)), ("wpe", (cfg.block_size, C))]
    for i in range(cfg.n_layer):
        shapes += [
            (f"h.{i}.ln1.g", (C,)),
            (f"h.{i}.attn.qkv", (C, 3 * C)),
            (f"h.{i}.attn.proj", (C, C)),
            (f"h.{i}.ln2.g", (C,)),
            (f"h.{i}.mlp.fc", (C, 4 * C)),
            (f"h.{i}.mlp.proj", (4 * C, C)),
        ]
    shapes += [("ln_f.g", (C,)), ("lm_head", (C, V))]
    return shapes


def count_parameters(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for _, s in parameter_shapes(cfg))


class FlatTensors:
    """One contiguous 1-D buffer with a named, shaped view onto each tensor in it."""

    def __init__(self, shapes, dtype, xp=np):
        self.shapes = list(shapes)
        self.offsets = {}
        n = 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            self.offsets[name] = (n, n + size)
            n += size
        self.flat = xp.zeros(n, dtype=dtype)
        self.views = {name: self.flat[a:b].reshape(shape)
                      for (name, shape), (a, b) in zip(self.shapes, self.offsets.values())}

    def __getitem__(self, name):
        return self.views[name]

    def names(self):
        return [name for name, _ in self.shapes]


class GPT:
    def __init__(self, cfg: ModelConfig, seed: int | None = 0, dtype=np.float32, ops=reference):
        cfg.validate()
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.ops = ops
        shapes = parameter_shapes(cfg)
        self.params = FlatTensors(shapes, self.dtype)
        self.grads = FlatTensors(shapes, self.dtype)
        self._cache = None
        if seed is not None:
            self.init_weights(np.random.default_rng(seed))

    @property
    def num_params(self) -> int:
        return self.params.flat.size

    def init_weights(self, rng) -> None:
        # GPT-2 init: N(0, 0.02) for every matrix, residual output projections scaled by
        # 1/sqrt(2 n_layer) (two residual adds per block), norm gains 1. Drawn in float64 so a
        # float32 and a float64 model from the same seed start from the same numbers.
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, shape in self.params.shapes:
            if name.endswith(".g"):
                self.params[name][...] = 1.0
            else:
                std = resid_std if name.endswith("proj") else 0.02
                self.params[name][...] = rng.standard_normal(shape) * std

    def decay_mask(self):
        """1 for tensors that get weight decay (the matrices), 0 for norm gains."""
        mask = np.zeros(self.num_params, dtype=self.dtype)
        for name, shape in self.params.shapes:
            if len(shape) == 2:
                a, b = self.params.offsets[name]
                mask[a:b] = 1.0
        return mask

    # ----------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, rng=None):
        """idx (B, T) ints -> logits (B, T, V), and the mean loss when targets are given.

        `rng` drives dropout; None means evaluation (no dropout). The activations needed by
        `backward` are kept only when targets are given.
        """
        ops, p, cfg = self.ops, self.params, self.cfg
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        drop = cfg.dropout if rng is not None else 0.0
        x = ops.embedding_forward(p["wte"], p["wpe"], idx)                    # (B, T, C)
        blocks = []
        for i in range(cfg.n_layer):
            x, cache = self._block_forward(x, i, drop, rng)
            blocks.append(cache)
        xf, lnf_cache = ops.rmsnorm_forward(x, p["ln_f.g"])                   # (B, T, C)
        logits = ops.linear_forward(xf, p["lm_head"])                         # (B, T, V)
        if targets is None:
            self._cache = None
            return logits, None
        loss, ce_cache = ops.cross_entropy_forward(logits, targets)
        self._cache = (idx, blocks, xf, lnf_cache, ce_cache, logits.shape)
        return logits, float(loss)

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without keeping activations (evaluation)."""
        _, loss = self.forward(idx, targets)
        self._cache = None
        return loss

    def backward(self):
        """Gradient of the last forward's mean loss w.r.t. every parameter, into self.grads."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() with targets first")
        ops, p, g, cfg = self.ops, self.params, self.grads, self.cfg
        idx, blocks, xf, lnf_cache, ce_cache, logits_shape = self._cache
        dlogits = ops.cross_entropy_backward(ce_cache, logits_shape)          # (B, T, V)
        dxf, g["lm_head"][...] = ops.linear_backward(dlogits, xf, p["lm_head"])
        dx, g["ln_f.g"][...] = ops.rmsnorm_backward(dxf, p["ln_f.g"], lnf_cache)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(dx, i, blocks[i])
        g["wte"][...], g["wpe"][...] = ops.embedding_backward(
            dx, idx, cfg.vocab_size, cfg.block_size)
        self._cache = None

    # ----------------------------------------------------------------------------------------
    def _block_forward(self, x, i, drop, rng):
        ops, p, H = self.ops, self.params, self.cfg.n_head
        pre = f"h.{i}."
        # attention half: x1 = x + dropout(proj(attention(qkv(rmsnorm(x)))))
        xn1, ln1 = ops.rmsnorm_forward(x, p[pre + "ln1.g"])                   # (B, T, C)
        qkv = ops.linear_forward(xn1, p[pre + "attn.qkv"])                    # (B, T, 3C)
        y, att = ops.attention_forward(qkv, H)                                # (B, T, C)
        a = ops.linear_forward(y, p[pre + "attn.proj"])                       # (B, T, C)
        x1, mask1 = ops.residual_dropout_forward(x, a, drop, rng)             # x + dropout(a)
        # MLP half: x2 = x1 + dropout(proj(relu(fc(rmsnorm(x1)))^2))
        xn2, ln2 = ops.rmsnorm_forward(x1, p[pre + "ln2.g"])                  # (B, T, C)
        h = ops.linear_forward(xn2, p[pre + "mlp.fc"])                        # (B, T, 4C)
        hr, relu = ops.squared_relu_forward(h)                                # (B, T, 4C)
        m = ops.linear_forward(hr, p[pre + "mlp.proj"])                       # (B, T, C)
        x2, mask2 = ops.residual_dropout_forward(x1, m, drop, rng)            # x1 + dropout(m)
        return x2, (xn1, ln1, qkv, y, att, mask1, xn2, ln2, hr, relu, mask2)

    def _block_backward(self, dx2, i, cache):
        ops, p, g = self.ops, self.params, self.grads
        pre = f"h.{i}."
        xn1, ln1, qkv, y, att, mask1, xn2, ln2, hr, relu, mask2 = cache
        # MLP half, in reverse (`del`: each gradient is freed once used, which keeps backward's
        # peak memory ~7% lower on the 256-dim config: big (B, T, 4C) arrays never pile up)
        dx1, dm = ops.residual_dropout_backward(dx2, mask2)
        dhr, g[pre + "mlp.proj"][...] = ops.linear_backward(dm, hr, p[pre + "mlp.proj"])
        del dm
        dh = ops.squared_relu_backward(dhr, relu)
        del dhr
        dxn2, g[pre + "mlp.fc"][...] = ops.linear_backward(dh, xn2, p[pre + "mlp.fc"])
        del dh
        dx1_ln, g[pre + "ln2.g"][...] = ops.rmsnorm_backward(dxn2, p[pre + "ln2.g"], ln2)
        del dxn2
        dx1 = dx1 + dx1_ln
        del dx1_ln
        # attention half, in reverse
        dx, da = ops.residual_dropout_backward(dx1, mask1)
        dy, g[pre + "attn.proj"][...] = ops.linear_backward(da, y, p[pre + "attn.proj"])
        del da
        dqkv = ops.attention_backward(dy, att)
        del dy
        dxn1, g[pre + "attn.qkv"][...] = ops.linear_backward(dqkv, xn1, p[pre + "attn.qkv"])
        del dqkv
        dx_ln, g[pre + "ln1.g"][...] = ops.rmsnorm_backward(dxn1, p[pre + "ln1.g"], ln1)
        return dx + dx_ln

    # ----------------------------------------------------------------------------------------
    # Generation with a KV cache: `prefill` runs a prompt once and keeps every layer's keys and
    # values; each `decode_step` then costs one position's work per layer. Positions are
    # absolute (wpe), so a cache only ever holds positions 0..block_size-1 of one window; the
    # caller slides the window by prefilling again (see sample.Decoder).

    def new_kv_cache(self) -> "KVCache":
        """An empty cache for this model's current weights (make a new one if they change)."""
        return KVCache(self)

    def prefill(self, ids, cache: "KVCache"):
        """ids (T,) at positions 0..T-1 -> logits (T, V); the cache restarts and holds T
        positions. The same ops as `forward`, so the logits are forward's for this window."""
        ops, p, cfg = self.ops, self.params, self.cfg
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                  # (1, T)
        T, C, H = ids.shape[1], cfg.n_embd, cfg.n_head
        if not 1 <= T <= cfg.block_size:
            raise ValueError(f"prefill needs 1..{cfg.block_size} tokens, got {T}")
        x = ops.embedding_forward(p["wte"], p["wpe"], ids)                    # (1, T, C)
        for i in range(cfg.n_layer):
            pre = f"h.{i}."
            xn1, _ = ops.rmsnorm_forward(x, p[pre + "ln1.g"])
            qkv = ops.linear_forward(xn1, p[pre + "attn.qkv"])                # (1, T, 3C)
            # keep k and v per head: (T, C) -> (H, T, hs)
            cache.k[i, :, :T] = qkv[0, :, C:2 * C].reshape(T, H, -1).transpose(1, 0, 2)
            cache.v[i, :, :T] = qkv[0, :, 2 * C:].reshape(T, H, -1).transpose(1, 0, 2)
            y, _ = ops.attention_forward(qkv, H)                              # (1, T, C)
            x = ops.residual_forward(x, ops.linear_forward(y, p[pre + "attn.proj"]))
            xn2, _ = ops.rmsnorm_forward(x, p[pre + "ln2.g"])
            hr, _ = ops.squared_relu_forward(ops.linear_forward(xn2, p[pre + "mlp.fc"]))
            x = ops.residual_forward(x, ops.linear_forward(hr, p[pre + "mlp.proj"]))
        xf, _ = ops.rmsnorm_forward(x, p["ln_f.g"])
        cache.length = T
        return ops.linear_forward(xf, p["lm_head"])[0]                        # (T, V)

    def decode_step(self, token: int, cache: "KVCache"):
        """One token at position cache.length -> logits (V,) for the position after it.

        The same math as `forward` for one row, written for few NumPy calls per token: the
        RMSNorm gains and the attention scale are folded into the cache's copy of the weights,
        and attention reads the cached keys/values of positions 0..pos as (H, 1, n) matmuls.
        """
        pos = cache.length
        if pos >= self.cfg.block_size:
            raise ValueError(f"the KV cache is full ({pos} positions): slide the window by "
                             "prefilling its most recent tokens again")
        C, H, eps, n = cache.n_embd, cache.n_head, cache.eps, pos + 1
        x = cache.wte[token] + cache.wpe[pos]                                 # (C,)
        for (w_qkv, w_proj, w_fc, w_mlp), k, v in zip(cache.weights, cache.k, cache.v):
            xn = x * (1.0 / math.sqrt(float(x @ x) / C + eps))                # rmsnorm, gain folded
            qkv = xn @ w_qkv                                                  # (3C,), q pre-scaled
            k[:, pos] = qkv[C:2 * C].reshape(H, -1)                           # (H, hs) into (H, T, hs)
            v[:, pos] = qkv[2 * C:].reshape(H, -1)
            att = qkv[:C].reshape(H, 1, -1) @ k[:, :n].transpose(0, 2, 1)     # (H, 1, n)
            att -= att.max(axis=-1, keepdims=True)                            # stable softmax
            np.exp(att, out=att)
            y = (att @ v[:, :n]) / att.sum(axis=-1, keepdims=True)            # (H, 1, hs)
            x += y.reshape(C) @ w_proj
            xn = x * (1.0 / math.sqrt(float(x @ x) / C + eps))
            h = xn @ w_fc                                                     # (4C,)
            np.maximum(h, 0.0, out=h)
            h *= h                                                            # relu(h)^2
            x += h @ w_mlp
        cache.length = n
        xf = x * (1.0 / math.sqrt(float(x @ x) / C + eps))
        return xf @ cache.lm_head                                             # (V,)


class KVCache:
    """Keys and values of every layer for positions 0..length-1 of one window, and the
    decode-time copy of the weights (norm gains folded into the matrix after each norm:
    (xhat * g) @ W == xhat @ (g[:, None] * W); the q columns also carry 1/sqrt(hs))."""

    def __init__(self, model: GPT):
        cfg, p, dt = model.cfg, model.params, model.dtype
        C, H = cfg.n_embd, cfg.n_head
        hs = C // H
        self.n_embd, self.n_head, self.eps = C, H, 1e-5    # eps: reference rmsnorm's default
        self.k = np.zeros((cfg.n_layer, H, cfg.block_size, hs), dtype=dt)   # (L, H, T, hs)
        self.v = np.zeros_like(self.k)
        self.length = 0
        self.wte, self.wpe = p["wte"].copy(), p["wpe"].copy()
        self.lm_head = p["ln_f.g"][:, None] * p["lm_head"]                  # (C, V)
        self.weights = []
        for i in range(cfg.n_layer):
            pre = f"h.{i}."
            w_qkv = p[pre + "ln1.g"][:, None] * p[pre + "attn.qkv"]         # (C, 3C)
            w_qkv[:, :C] *= dt.type(1.0 / math.sqrt(hs))
            w_fc = p[pre + "ln2.g"][:, None] * p[pre + "mlp.fc"]            # (C, 4C)
            self.weights.append((w_qkv, p[pre + "attn.proj"].copy(), w_fc,
                                 p[pre + "mlp.proj"].copy()))
