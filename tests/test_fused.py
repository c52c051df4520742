"""The fused backend's ops against the readable reference they replace, its options, and the
fast path end to end: whole-model finite differences, a short training run, the fused AdamW,
the thread policy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from randygpt.config import ModelConfig
from randygpt.model import GPT
from randygpt.ops import contract, reference
from randygpt.ops.fused import choose, elementwise, memory, sgemm
from randygpt.optim import AdamW, clip_grad_norm
from randygpt import threads
from gradcheck import check_model_gradient, rel_error

fused = contract.get_backend("fused")
EPS = 1e-5

RNG = np.random.default_rng(0)
DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-6, np.float64: 1e-12}    # relative error of whole tensors


def close(a, b, dtype):
    err = rel_error(a, b)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


def normal(*shape, dtype=np.float32, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


# --------------------------------------------------------------------------------------------
# Each op: fused forward and backward == reference forward and backward

def test_fast_exp_matches_numpy_exp():
    x = np.concatenate([-np.linspace(0, 87, 100_001), [0.0, -1e-30, -0.5, -86.9]])
    x = x.astype(np.float32).astype(np.float64)                     # exact float32 inputs
    got = elementwise.fast_exp(x.astype(np.float32)).astype(np.float64)
    rel = np.abs(got - np.exp(x)) / np.exp(x)
    assert rel.max() < 5e-7
    assert got[-4] == 1.0
    assert elementwise.fast_exp(np.float32([-200.0]))[0] < 2e-38         # clamped: tiny, not garbage


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(dtype):
    wte, wpe = normal(11, 8, dtype=dtype), normal(9, 8, dtype=dtype)
    idx = RNG.integers(0, 11, (3, 7))
    idx[0, :3] = 4                                                  # repeats must accumulate
    out, cache = fused.embedding_forward(wte, wpe, idx)
    ref_out, ref_cache = reference.embedding_forward(wte, wpe, idx)
    np.testing.assert_array_equal(out, ref_out)
    dout = normal(3, 7, 8, dtype=dtype)
    got, want = fused.embedding_backward(dout, cache), reference.embedding_backward(dout, ref_cache)
    assert got[0] is None and want[0] is None and len(got) == len(want) == 3
    for g, w in zip(got[1:], want[1:]):
        close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 40, 130)])
@pytest.mark.parametrize("zero_gain", [False, True])     # True: the cache must keep x instead
def test_rmsnorm(dtype, shape, zero_gain):
    x, g, dout = normal(*shape, dtype=dtype, scale=3), normal(shape[-1], dtype=dtype), \
        normal(*shape, dtype=dtype)
    if zero_gain:
        g[3] = 0.0
    out, cache = fused.rmsnorm_forward(x, g, EPS)
    ref_out, ref_cache = reference.rmsnorm_forward(x, g, EPS)
    close(out, ref_out, dtype)
    assert out.dtype == dtype and out.shape == shape
    # the cache keeps the output (no second (N, C) array), or x where a gain is ~0
    assert np.shares_memory(cache.xhat_source, x if zero_gain else out)
    got, want = fused.rmsnorm_backward(dout, cache), reference.rmsnorm_backward(dout, ref_cache)
    assert len(got) == len(want) == 2
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 3), (6, 128, 64), (97, 130, 128),
                                   (203, 64, 200), (300, 256, 67)])
def test_own_sgemm_matches_matmul(dtype, M, K, N):
    # rows not a multiple of the 6-row block or the 96-row chunk, columns not whole 64-wide
    # panels (padded), B C-contiguous or a transposed view (copied)
    a, b = normal(M, K, dtype=dtype), normal(K, N, dtype=dtype)
    close(sgemm.sgemm(a, b), a @ b, dtype)
    bt = np.asfortranarray(b)
    out = np.full((M, N), np.nan, dtype=dtype)
    assert sgemm.sgemm(a, bt, out) is out
    close(out, a @ b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,M,N", [(3, 2, 5), (7, 13, 64), (1000, 20, 70), (2100, 128, 256)])
def test_own_weight_gradient_kernel_matches_matmul(dtype, K, M, N):
    # a long sum (K positions) cut into 8 parts and 256-deep blocks, none of them whole; fewer
    # positions than parts; rows and columns not whole 6 x 64 blocks; A a transposed view
    x, d = normal(K, M, dtype=dtype), normal(K, N, dtype=dtype)
    out = np.full((M, N), np.nan, dtype=dtype)
    assert sgemm.sgemm_deep(x.T, d, out) is out
    close(out, x.T @ d, dtype)


@pytest.mark.parametrize("kernels", ["blas", "own", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,IN,OUT", [(3, 5, 12, 20), (2, 8, 64, 96), (4, 50, 128, 192),
                                        (4, 130, 128, 256)])
def test_linear(dtype, B, T, IN, OUT, kernels, monkeypatch, tmp_path):
    # every kernel choice against the reference: "own" sends every float32 product (x @ W,
    # dout @ W^T, the weight gradient) to the own kernels, "blas" none, "auto" what it timed
    choice = choose.KernelChoice(kernels, path=str(tmp_path / "kernels.json"))
    backend = contract.get_backend("fused", kernels=choice)
    calls = []
    monkeypatch.setattr(sgemm, "sgemm", lambda *a, _f=sgemm.sgemm: calls.append(1) or _f(*a))
    monkeypatch.setattr(sgemm, "sgemm_deep",
                        lambda *a, _f=sgemm.sgemm_deep: calls.append(2) or _f(*a))
    x, w, dout = normal(B, T, IN, dtype=dtype), normal(IN, OUT, dtype=dtype), \
        normal(B, T, OUT, dtype=dtype)
    out, cache = backend.linear_forward(x, w)
    ref_out, ref_cache = reference.linear_forward(x, w)
    close(out, ref_out, dtype)
    got, want = backend.linear_backward(dout, cache), reference.linear_backward(dout, ref_cache)
    assert len(got) == len(want) == 2
    for got, want in zip(got, want):
        assert got.shape == want.shape
        close(got, want, dtype)
    if kernels == "auto":
        assert set(choice.ran.values()) <= {"blas", "own"}
        assert (len(choice.ran) == 3) == (dtype == np.float32 and 2 * B * T * IN * OUT
                                          >= choose.SMALL_FLOPS)
    else:
        takes_own = kernels == "own" and dtype == np.float32
        assert sorted(calls) == ([1, 1, 2] if takes_own else [])


class FakeTimer:
    """Times by the kernel that runs: OpenBLAS `blas_s`, the own sgemm `own_s` seconds."""
    def __init__(self, blas_s, own_s, monkeypatch):
        self.blas_s, self.own_s, self.calls, self.last = blas_s, own_s, [], None
        for name in ("sgemm", "sgemm_deep"):
            monkeypatch.setattr(sgemm, name, lambda *a, _f=getattr(sgemm, name):
                                setattr(self, "last", "own") or _f(*a))

    def __call__(self, fns):
        times = []
        for fn in fns:
            self.last = "blas"
            fn()
            self.calls.append(self.last)
            times.append(self.own_s if self.last == "own" else self.blas_s)
        return times


@pytest.mark.parametrize("own_s, winner", [(0.5, "own"), (0.95, "blas"), (2.0, "blas")])
def test_kernel_choice_keeps_the_faster_and_near_ties_go_to_openblas(own_s, winner,
                                                                     monkeypatch, tmp_path):
    path = str(tmp_path / "kernels.json")
    timer = FakeTimer(1.0, own_s, monkeypatch)
    choice = choose.KernelChoice("auto", path=path, timer=timer)
    backend = contract.get_backend("fused", kernels=choice)
    x, w = normal(4, 130, 128), normal(128, 256)
    out, cache = backend.linear_forward(x, w)
    close(out, x @ w, np.float32)
    backend.linear_forward(x, w)                                     # decided: not timed again
    assert timer.calls == ["blas", "own"]
    assert list(choice.ran.values()) == [winner]
    # the decision is on disk, under this machine's key; a new process starts without timing
    saved = json.load(open(path))[choose.machine_key()]
    assert [d["kernel"] for d in saved.values()] == [winner]
    again = choose.KernelChoice("auto", path=path, timer=lambda fns: pytest.fail("timed"))
    out2, _ = contract.get_backend("fused", kernels=again).linear_forward(x, w)
    close(out2, x @ w, np.float32)
    assert list(again.ran.values()) == [winner]


@pytest.mark.parametrize("own_s, deep_timed", [(1.6, False), (1.2, True)])
def test_the_deep_kernel_is_not_compiled_where_the_row_kernel_lost_everywhere(
        own_s, deep_timed, monkeypatch, tmp_path):
    timer = FakeTimer(1.0, own_s, monkeypatch)
    deep_calls = []
    real_deep = sgemm.sgemm_deep
    monkeypatch.setattr(sgemm, "sgemm_deep", lambda *a: deep_calls.append(1) or real_deep(*a))
    choice = choose.KernelChoice("auto", path=str(tmp_path / "kernels.json"), timer=timer)
    backend = contract.get_backend("fused", kernels=choice)
    x = normal(4, 130, 128)
    for out_dim in (256, 320, 384):                   # three row products, each timed
        backend.linear_forward(x, normal(128, out_dim))
    assert choice.own_row_kernel_hopeless() == (not deep_timed)
    w = normal(128, 256)
    dout = normal(4, 130, 256)
    dx, dw = backend.linear_backward(dout, (x, w))       # a rows and a deep product
    close(dw, x.reshape(-1, 128).T @ dout.reshape(-1, 256), np.float32)
    deep = [d for k, d in choice.decisions.items() if k.startswith("deep ")]
    assert len(deep) == 1 and deep[0]["kernel"] == "blas"
    assert (deep[0]["own_s"] is not None) == deep_timed
    assert bool(deep_calls) == deep_timed                 # not even the 2 x 2 trial
    assert ("own_skipped" in deep[0]) == (not deep_timed)
    assert any("not timed" in line for line in choice.summary()) == (not deep_timed)


def test_kernel_choice_survives_a_bad_decision_file_and_a_broken_own_kernel(monkeypatch,
                                                                            tmp_path):
    path = tmp_path / "kernels.json"
    path.write_text("{ not json")
    monkeypatch.setattr(sgemm, "sgemm", lambda *a: 1 / 0)          # fails here: no candidate
    timer = FakeTimer(1.0, 0.01, monkeypatch)
    choice = choose.KernelChoice("auto", path=str(path), timer=timer)
    x, w = normal(4, 130, 128), normal(128, 256)
    out, _ = contract.get_backend("fused", kernels=choice).linear_forward(x, w)
    close(out, x @ w, np.float32)
    assert not choice.own_works() and list(choice.ran.values()) == ["blas"]
    assert json.load(open(path))                                    # rewritten, readable


def test_kernel_choice_from_the_environment(monkeypatch):
    from randygpt.errors import UserError
    for env, mode in (({}, "auto"), ({"RANDYGPT_SGEMM": "own"}, "own"),
                      ({"RANDYGPT_SGEMM": "BLAS"}, "blas"), ({"RANDYGPT_OWN_SGEMM": "0"}, "blas")):
        assert choose.mode_from_environment(env) == mode
    monkeypatch.setenv("RANDYGPT_SGEMM", "fastest")
    with pytest.raises(UserError) as e:
        contract.get_backend("fused")
    assert "RANDYGPT_SGEMM" in str(e.value) and "auto, blas, own" in str(e.value)
    monkeypatch.setenv("RANDYGPT_SGEMM", "own")
    assert contract.get_backend("fused").options["kernels"].mode == "own"
    assert contract.get_backend("fused", own_sgemm=False).options["kernels"].mode == "blas"


# T: 1, not a multiple of the 4-row or 16-column tiles, several tiles; hs: 1 and 4 (padded
# to a 16-wide tile), 16, 32
@pytest.mark.parametrize("B,T,H,hs", [(2, 1, 1, 1), (2, 6, 3, 4), (3, 64, 8, 16),
                                      (1, 70, 2, 32), (1, 150, 2, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(B, T, H, hs, dtype):
    C = H * hs
    qkv, dout = normal(B, T, 3 * C, dtype=dtype, scale=2), normal(B, T, C, dtype=dtype)
    out, cache = fused.attention_forward(qkv, H)
    ref_out, ref_cache = reference.attention_forward(qkv, H)
    close(out, ref_out, dtype)
    (dqkv,), (ref_dqkv,) = (fused.attention_backward(dout, cache),
                            reference.attention_backward(dout, ref_cache))
    close(dqkv, ref_dqkv, dtype)


def test_attention_keeps_no_t_by_t_matrix():
    qkv = normal(4, 128, 3 * 64)
    _, cache = fused.attention_forward(qkv, 4)
    kept = sum(a.nbytes for a in cache if isinstance(a, np.ndarray) and a is not qkv)
    assert kept < 4 * 128 * 64 * 4 * 1.1           # the output + one lse per row, no (T, T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_squared_relu(dtype):
    x, dout = normal(4, 6, 40, dtype=dtype), normal(4, 6, 40, dtype=dtype)
    out, cache = fused.squared_relu_forward(x)
    ref_out, ref_cache = reference.squared_relu_forward(x)
    np.testing.assert_array_equal(out, ref_out)
    assert np.shares_memory(cache, out)                  # the cache is the output itself
    (dx,), (ref_dx,) = (fused.squared_relu_backward(dout, cache),
                        reference.squared_relu_backward(dout, ref_cache))
    close(dx, ref_dx, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 40, 130)])
def test_layernorm(dtype, shape):
    x = normal(*shape, dtype=dtype, scale=3) + 2                     # off-centre rows
    g, b, dout = normal(shape[-1], dtype=dtype), normal(shape[-1], dtype=dtype), \
        normal(*shape, dtype=dtype)
    out, cache = fused.layernorm_forward(x, g, b, EPS)
    ref_out, ref_cache = reference.layernorm_forward(x, g, b, EPS)
    close(out, ref_out, dtype)
    assert out.dtype == dtype and out.shape == shape
    got = fused.layernorm_backward(dout, cache)
    want = reference.layernorm_backward(dout, ref_cache)
    assert len(got) == len(want) == 3
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype):
    x, dout = normal(4, 6, 40, dtype=dtype, scale=3), normal(4, 6, 40, dtype=dtype)
    out, cache = fused.gelu_forward(x)
    ref_out, ref_cache = reference.gelu_forward(x)
    close(out, ref_out, dtype)
    (dx,), (ref_dx,) = fused.gelu_backward(dout, cache), reference.gelu_backward(dout, ref_cache)
    close(dx, ref_dx, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])    # True: a tied head's wte^T view
def test_linear_bias(dtype, transposed):
    x, b, dout = normal(3, 7, 64, dtype=dtype), normal(96, dtype=dtype), \
        normal(3, 7, 96, dtype=dtype)
    w = normal(96, 64, dtype=dtype).T if transposed else normal(64, 96, dtype=dtype)
    out, cache = fused.linear_bias_forward(x, w, b)
    ref_out, ref_cache = reference.linear_bias_forward(x, w, b)
    close(out, ref_out, dtype)
    got = fused.linear_bias_backward(dout, cache)
    want = reference.linear_bias_backward(dout, ref_cache)
    assert len(got) == len(want) == 3
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape
        close(g_, w_, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_same_mask_bit_for_bit(dtype):
    # dropout alone is the residual form with x = 0: 0 + f * scale is exact
    x, dout = normal(4, 9, 33, dtype=dtype), normal(4, 9, 33, dtype=dtype)
    zero = np.zeros_like(x)
    out, key = fused.residual_dropout_forward(zero, x, 0.3, np.random.default_rng(5))
    ref_out, ref_mask = reference.dropout_forward(x, 0.3, np.random.default_rng(5))
    np.testing.assert_array_equal(out, ref_out)
    assert 0.2 < (out == 0).mean() < 0.4
    assert all(np.ndim(k) == 0 for k in key)                   # a key, no mask is stored
    np.testing.assert_array_equal(fused.residual_dropout_backward(dout, key)[1],
                                  reference.dropout_backward(dout, ref_mask))
    same, none = fused.residual_dropout_forward(zero, x, 0.0, np.random.default_rng(5))
    assert none is None
    np.testing.assert_array_equal(same, x)
    dx, dfx = fused.residual_dropout_backward(dout, None)
    assert dx is dout and dfx is dout


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_dropout_same_as_reference(dtype):
    x, f, dout = (normal(4, 9, 33, dtype=dtype) for _ in range(3))
    out, mask = fused.residual_dropout_forward(x, f, 0.3, np.random.default_rng(8))
    ref_out, ref_mask = reference.residual_dropout_forward(x, f, 0.3, np.random.default_rng(8))
    close(out, ref_out, dtype)                   # one rounding less: x + f * scale is an FMA
    np.testing.assert_array_equal(out == x, ref_out == x)                 # the same units dropped
    dx, df = fused.residual_dropout_backward(dout, mask)
    ref_dx, ref_df = reference.residual_dropout_backward(dout, ref_mask)
    np.testing.assert_array_equal(dx, ref_dx)
    np.testing.assert_array_equal(df, ref_df)
    plain, none = fused.residual_dropout_forward(x, f, 0.0, np.random.default_rng(8))
    assert none is None
    np.testing.assert_array_equal(plain, x + f)
    plain, none = fused.residual_dropout_forward(x, f, 0.3, None)     # evaluation: no rng
    assert none is None
    np.testing.assert_array_equal(plain, x + f)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("dloss", [1.0, 0.25])
def test_cross_entropy(dtype, ignore, dloss):
    logits, targets = normal(3, 7, 11, dtype=dtype, scale=4), RNG.integers(0, 11, (3, 7))
    if ignore:
        targets[1, 2:] = -1                                         # padding: left out
    loss, cache = fused.cross_entropy_forward(logits, targets)
    ref_loss, ref_cache = reference.cross_entropy_forward(logits, targets)
    assert loss == pytest.approx(float(ref_loss), rel=TOL[dtype] * 10)
    (dlogits,), (ref_dlogits,) = (fused.cross_entropy_backward(dloss, cache),
                                  reference.cross_entropy_backward(dloss, ref_cache))
    assert dlogits.shape == logits.shape
    close(dlogits, ref_dlogits, dtype)


# --------------------------------------------------------------------------------------------
# The backend and its options

def test_fused_backend_implements_all_but_generation_attention():
    assert fused.own == set(contract.OP_NAMES) - {"kv_attention_forward"}
    assert fused.kv_attention_forward is reference.kv_attention_forward
    assert fused.options["buffer_pool"] is True


def owner(a):
    """The object that owns an array's memory (the end of its chain of bases)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def test_backends_with_different_options_coexist(monkeypatch):
    # two backends in one process, each reading its own options on every call
    calls = []
    monkeypatch.setattr(sgemm, "sgemm", lambda *a, _f=sgemm.sgemm: calls.append(1) or _f(*a))
    own = contract.get_backend("fused", kernels="own", buffer_pool=True)
    blas = contract.get_backend("fused", kernels="blas", buffer_pool=False)
    assert own.options["kernels"].mode == "own" and blas.options["kernels"].mode == "blas"
    x, w = normal(4, 130, 128), normal(128, 256)
    for backend, want_calls in ((own, [1]), (blas, []), (own, [1])):
        calls.clear()
        out, _ = backend.linear_forward(x, w)
        assert calls == want_calls
        close(out, x @ w, np.float32)
    big = normal(4, 130, 1024)                                        # 2 MiB: pooled
    pooled, _ = own.squared_relu_forward(big)
    fresh, _ = blas.squared_relu_forward(big)
    assert isinstance(owner(pooled), memory.BufferPool._Lease)
    assert isinstance(owner(fresh), np.ndarray)                        # plain np.empty
    np.testing.assert_array_equal(pooled, fresh)


def test_an_unknown_option_is_a_user_error():
    from randygpt.errors import UserError
    with pytest.raises(UserError) as e:
        contract.get_backend("fused", own_sgem=False)
    assert e.value.field == "backend" and "own_sgem" in str(e.value)


def test_backends_share_one_buffer_pool_unless_given_their_own():
    private = memory.BufferPool(min_bytes=0)
    a = contract.get_backend("fused", buffer_pool=private)
    out, _ = a.squared_relu_forward(normal(3, 4))                      # tiny, yet pooled
    assert sum(map(len, private.free.values())) == 0
    del out, _
    assert sum(map(len, private.free.values())) == 1                   # back in its free list
    assert contract.get_backend("fused").options["buffer_pool"] is True   # memory.SHARED


# --------------------------------------------------------------------------------------------
# AdamW: one fused pass == the readable update

@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_adamw_matches_adamw(dtype):
    p0 = normal(10_001, dtype=dtype)
    mask = (RNG.random(10_001) < 0.8).astype(dtype)
    ref, fast = p0.copy(), p0.copy()
    ref_opt = AdamW(ref, mask, 0.9, 0.95, eps=1e-8, weight_decay=0.1)
    fast_opt = AdamW(fast, mask, 0.9, 0.95, eps=1e-8, weight_decay=0.1, backend=fused)
    for t in range(1, 8):
        g = normal(10_001, dtype=dtype)
        ref_opt.step(g.copy(), 1e-2 * t)
        fast_opt.step(g.copy(), 1e-2 * t)
    assert fast_opt.step_count == 7
    close(fast - p0, ref - p0, dtype)                               # the updates themselves
    close(fast_opt.m, ref_opt.m, dtype)
    close(fast_opt.v, ref_opt.v, dtype)


# --------------------------------------------------------------------------------------------
# The whole model through the fast path

CFG = dict(vocab_size=9, block_size=6, n_layer=2, n_embd=8, n_head=2, dropout=0.25)


GPT2 = dict(norm="layernorm", activation="gelu", bias=True, tied_head=True)


def rough_model(dtype, backend, seed=0, **variant):
    """Large random weights, as in test_model, so every path carries gradient."""
    m = GPT(ModelConfig(**CFG, **variant), seed=None, dtype=dtype, backend=backend)
    rng = np.random.default_rng(seed)
    for name, shape in m.params.shapes:
        m.params[name][...] = (1.0 if name.endswith(".g") else 0.0) + rng.normal(0, 0.5, shape)
    return m


@pytest.mark.parametrize("variant", [{}, GPT2], ids=["randygpt", "gpt2"])
def test_whole_model_gradient_through_fast_path_matches_finite_differences(variant):
    # float64 kernels (exact exp) against float64 central differences, dropout on
    m = rough_model(np.float64, fused, **variant)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 9, (3, 5)), rng.integers(0, 9, (3, 5))

    def loss():
        return m.forward(x, y, rng=np.random.default_rng(7))[1]

    loss()
    m.backward()
    check_model_gradient(m, loss, tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_model_matches_reference_model(dtype):
    ref, fast = rough_model(dtype, "reference"), rough_model(dtype, fused)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 9, (4, 6)), rng.integers(0, 9, (4, 6))
    y[0, 3:] = -1
    l_ref = ref.forward(x, y, rng=np.random.default_rng(8))[1]
    l_fast = fast.forward(x, y, rng=np.random.default_rng(8))[1]
    assert l_fast == pytest.approx(l_ref, rel=TOL[dtype] * 10)
    ref.backward()
    fast.backward()
    close(fast.grads.flat, ref.grads.flat, dtype)
    logits_ref, _ = ref.forward(x)
    logits_fast, _ = fast.forward(x)
    close(logits_fast, logits_ref, dtype)


def train_losses(backend, steps=25):
    """A short float32 run with dropout: the loss of every step, from one seed."""
    cfg = ModelConfig(vocab_size=20, block_size=32, n_layer=2, n_embd=32, n_head=4, dropout=0.1)
    model = GPT(cfg, seed=0, backend=backend)
    opt = AdamW(model.params.flat, model.decay_mask(), 0.9, 0.99, weight_decay=0.01,
                backend=model.backend)
    data_rng, drop_rng = np.random.default_rng(1), np.random.default_rng(2)
    text = np.tile(np.arange(20), 50)                               # learnable: a cycle
    losses = []
    for _ in range(steps):
        starts = data_rng.integers(0, len(text) - 33, 8)
        rows = starts[:, None] + np.arange(32)
        losses.append(model.forward(text[rows], text[rows + 1], rng=drop_rng)[1])
        model.backward()
        clip_grad_norm(model.grads.flat, 1.0)
        opt.step(model.grads.flat, 3e-3)
    return np.array(losses)


@pytest.mark.parametrize("pool_everything", [False, True])
def test_training_curve_fast_equals_reference(pool_everything):
    # pool_everything: every array recycled (normally only >= 1 MiB): lifetimes hold
    pool = memory.BufferPool(min_bytes=0) if pool_everything else True
    ref = train_losses("reference")
    fast = train_losses(contract.get_backend("fused", buffer_pool=pool))
    assert ref[-1] < ref[0] - 0.5                                   # it does learn
    np.testing.assert_allclose(fast, ref, rtol=2e-4)


@pytest.mark.parametrize("model_dtype", DTYPES)
def test_training_curve_is_the_same_on_one_thread_and_on_all(model_dtype, monkeypatch,
                                                            tmp_path):
    # every parallel kernel forced to one thread, then to all: the same losses and weights,
    # bit for bit (fixed chunks), so a thread decision never changes a run
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: nothing to compare")
    runs = []
    for mode in ("1", "all"):
        choice = choose.ThreadChoice(mode, path=str(tmp_path / "kernels.json"))
        monkeypatch.setattr(choose, "_THREAD_CHOICE", choice)
        runs.append(train_losses(contract.get_backend("fused")))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert runs[0][-1] < runs[0][0] - 0.5


class Kernel:                                           # stands in for a jit.ParallelKernel
    def __init__(self, name):
        self.__name__ = name


def run_trials(choice, name, args, one_s, all_s, all_threads=2):
    """Calls of kernel `name` until decided, each 'taking' one_s or all_s: the counts used."""
    used = []
    while True:
        n, trial = choice.threads(Kernel(name), args, all_threads)
        used.append(n)
        if trial is None:
            return used
        choice.observe(trial, n, one_s if n == 1 else all_s)


def test_thread_choice_keeps_one_thread_only_where_it_measured_faster(tmp_path):
    path = str(tmp_path / "kernels.json")
    choice = choose.ThreadChoice("auto", path=path)
    x = np.zeros((33, 128), np.float32)
    trials = [2, 1, 2, 1, 2, 1, 2]                 # a warm-up on all, then 3 each, alternating
    for name, one_s, all_s, want in (("rmsnorm_forward", 1.0, 2.0, 1),
                                     ("squared_relu_forward", 0.95, 1.0, 2),   # a near-tie
                                     ("attention_forward", 3.0, 1.0, 2)):
        assert run_trials(choice, name, (x, x, 1e-5), one_s, all_s) == trials + [want]
    # the warm-up (it compiles) does not count: a slow first call decides nothing
    first = choose.ThreadChoice("auto", path=str(tmp_path / "other.json"))
    n, trial = first.threads(Kernel("k"), (x,), 2)
    first.observe(trial, n, 100.0)
    assert run_trials(first, "k", (x,), 1.0, 2.0)[-1] == 1
    assert sorted(choice.ran) == sorted(f"threads {n} size<=8192 of 2" for n in (
        "rmsnorm_forward", "squared_relu_forward", "attention_forward"))
    # 5000 elements: the same size bucket, decided; 24576: a new one
    assert choice.threads(Kernel("rmsnorm_forward"), (np.zeros((50, 100)),), 2) == (1, None)
    assert run_trials(choice, "attention_forward", (np.zeros((64, 384)),), 3.0, 1.0)[-1] == 2
    # on disk: a new process reads them all and runs no trials
    saved = choose.read_decisions(path)
    assert {k: d["threads"] for k, d in saved.items()} == {
        "threads rmsnorm_forward size<=8192 of 2": 1,
        "threads squared_relu_forward size<=8192 of 2": 2,
        "threads attention_forward size<=8192 of 2": 2,
        "threads attention_forward size<=32768 of 2": 2}
    again = choose.ThreadChoice("auto", path=path)
    assert again.threads(Kernel("rmsnorm_forward"), (x,), 2) == (1, None)
    assert any("1: 1000000 us, all: 2000000 us" in line for line in choice.summary())
    # training's sizes keep all threads, untimed
    big = np.zeros(choose.ThreadChoice.LARGE, np.float32)
    assert choice.threads(Kernel("rmsnorm_forward"), (big,), 2) == (2, None)
    # forced either way, or a pool of one thread: no trials
    for mode, want in (("1", 1), ("all", 2)):
        forced = choose.ThreadChoice(mode, path=path)
        assert forced.threads(Kernel("new_kernel"), (x,), 2) == (want, None)
    assert again.threads(Kernel("new_kernel"), (x,), 1) == (1, None)


def test_thread_trials_run_on_the_real_calls_and_change_no_result(tmp_path, monkeypatch):
    # a real kernel (the fused AdamW) called until decided: every call is a real step, on
    # one thread or all, and each equals the reference AdamW's step
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: nothing to choose")
    choice = choose.ThreadChoice("auto", path=str(tmp_path / "kernels.json"))
    monkeypatch.setattr(choose, "_THREAD_CHOICE", choice)
    params, grads = normal(5000), normal(5000)
    want = params.copy()
    ref = AdamW(want, np.ones(5000, bool), 0.9, 0.99, weight_decay=0.0)
    fast = AdamW(params, np.ones(5000, bool), 0.9, 0.99, weight_decay=0.0, backend=fused)
    for _ in range(1 + choice.TRIALS + 2):
        ref.step(grads, 1e-3)
        fast.step(grads, 1e-3)
        np.testing.assert_allclose(params, want, rtol=1e-5, atol=1e-8)
    (key,) = choice.decisions
    assert key.startswith("threads adamw size<=8192") and choice.ran[key] in (1, 2)
    assert len(choice.trials[key]) == 1 + choice.TRIALS
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS   # restored


def test_kernel_threads_from_the_environment(monkeypatch):
    from randygpt.errors import UserError
    for env, mode in (({}, "auto"), ({"RANDYGPT_KERNEL_THREADS": "1"}, "1"),
                      ({"RANDYGPT_KERNEL_THREADS": " ALL"}, "all")):
        assert choose.thread_mode_from_environment(env) == mode
    monkeypatch.setenv("RANDYGPT_KERNEL_THREADS", "4")
    monkeypatch.setattr(choose, "_THREAD_CHOICE", None)
    with pytest.raises(UserError) as e:
        contract.get_backend("fused")
    assert "RANDYGPT_KERNEL_THREADS" in str(e.value) and "auto, all, 1" in str(e.value)


# --------------------------------------------------------------------------------------------
# Start-up and threads

def test_generation_path_does_not_import_numba():
    code = ("import sys, randygpt, randygpt.cli, randygpt.sample, randygpt.checkpoint; "
            "print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_thread_policy_fills_in_only_unset_variables():
    env = {"OMP_WAIT_POLICY": "active"}
    applied = threads.apply(env)
    assert env["OMP_WAIT_POLICY"] == "active" and "OMP_WAIT_POLICY" not in applied
    for name, value in threads.DEFAULTS.items():
        if name != "OMP_WAIT_POLICY":
            assert env[name] == value and applied[name] == value
    assert "OPENBLAS_CORETYPE" not in env


def test_thread_policy_is_in_place_before_numpy_loads():
    # an import hook records the variable at the moment `import numpy` starts
    code = """if True:
        import os, sys
        seen = []
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy" and not seen:
                    seen.append(os.environ.get("OMP_WAIT_POLICY"))
        sys.meta_path.insert(0, Spy())
        import randygpt
        print(seen[0])
    """
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == threads.DEFAULTS["OMP_WAIT_POLICY"]


def test_buffer_pool_reuses_memory_only_after_every_view_is_gone():
    pool = memory.BufferPool(min_bytes=64)
    a = pool.empty((4, 8), np.float32)
    view = a.reshape(32)[3:]                     # NumPy makes view.base the memory's owner
    address = a.__array_interface__["data"][0]
    del a
    b = pool.empty((32,), np.float32)            # `view` is alive: must not get its memory
    assert b.__array_interface__["data"][0] != address
    view[:] = 1.0
    assert not np.shares_memory(b, view)
    del view
    c = pool.empty((2, 16), np.float32)          # same size, now free: reused
    assert c.__array_interface__["data"][0] == address
    assert pool.empty((3,), np.float32).base is None      # small: plain np.empty


def test_uncached_names_kernels_until_their_float32_version_is_on_disk(tmp_path, monkeypatch):
    # what the first-run notice counts: a kernel is cold until numba has cached it for float32
    import importlib
    from randygpt.ops.fused import jit
    (tmp_path / "cold_kernel_module.py").write_text(
        "from numba import njit\n@njit(cache=True)\ndef double(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("cold_kernel_module")
    assert jit.uncached([module]) == [module.double]
    module.double(np.ones(3, np.float64))
    assert jit.uncached([module]) == [module.double]                 # float64 only
    module.double(np.ones(3, np.float32))
    assert jit.uncached([module]) == []
    assert contract.get_backend("fused").options["compile_seconds"]() >= 0


def _compile_settings(env_extra):
    code = ("import numba, json; from randygpt.ops.fused import jit, choose; "
            "print(json.dumps([numba.config.CPU_NAME, numba.config.CPU_FEATURES, "
            "choose.machine_key()]))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "RANDYGPT_VECTOR_BITS")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)


def test_512_bit_vectors_where_the_cpu_has_avx512_and_the_user_has_not_said_otherwise():
    import llvmlite.binding as llvm
    host = llvm.get_host_cpu_features().flatten()
    has_avx512 = "+avx512f" in host.split(",")
    r = _compile_settings({})
    name, features, key = json.loads(r.stdout)
    if has_avx512:                      # LLVM's preference for 256-bit vectors switched off
        assert name == llvm.get_host_cpu_name() and features == host + ",-prefer-256-bit"
        assert key.endswith("vectors 512-bit")
    else:                               # nothing to change: numba's own host settings
        assert name is None and features is None and key.endswith("vectors as LLVM tunes")
    name, features, key = json.loads(_compile_settings({"RANDYGPT_VECTOR_BITS": "256"}).stdout)
    assert name is None and features is None and key.endswith("vectors as LLVM tunes")
    mine = _compile_settings({"NUMBA_CPU_FEATURES": host})      # the user's setting wins
    assert json.loads(mine.stdout)[1] == host
    bad = _compile_settings({"RANDYGPT_VECTOR_BITS": "1024"})
    assert bad.returncode != 0 and "RANDYGPT_VECTOR_BITS='1024' is not a choice" in bad.stderr


@pytest.mark.parametrize("timed_at, now, retimed", [(3.0, 0.2, True), (3.0, 1.5, False),
                                                   (0.8, 0.2, False)])
def test_a_decision_timed_on_a_busy_machine_is_timed_again_once_it_is_quiet(
        timed_at, now, retimed, monkeypatch, tmp_path):
    # loads per core; timed busy (> BUSY) and now quiet (< QUIET): timed again
    path = str(tmp_path / "kernels.json")
    x, w = normal(4, 130, 128), normal(128, 256)
    monkeypatch.setattr(choose, "load_per_core", lambda: timed_at)
    first = choose.KernelChoice("auto", path=path, timer=FakeTimer(1.0, 0.5, monkeypatch))
    contract.get_backend("fused", kernels=first).linear_forward(x, w)
    (decision,) = choose.read_decisions(path).values()
    assert decision["kernel"] == "own" and decision["load_per_core"] == timed_at
    monkeypatch.setattr(choose, "load_per_core", lambda: now)
    timer = FakeTimer(1.0, 2.0, monkeypatch)                # now OpenBLAS is the faster
    again = choose.KernelChoice("auto", path=path, timer=timer)
    contract.get_backend("fused", kernels=again).linear_forward(x, w)
    assert timer.calls == (["blas", "own"] if retimed else [])
    assert list(again.ran.values()) == ["blas" if retimed else "own"]
