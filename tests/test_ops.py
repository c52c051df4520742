"""Every reference op's backward against float64 central finite differences, the two
forward-only ops against direct formulas, and the backend contract (ops/contract.py)."""
import types

import numpy as np
import pytest

from randygpt.errors import UserError
from randygpt.ops import contract
from randygpt.ops import reference as ops
from gradcheck import check_op

RNG = np.random.default_rng(0)


def weighted(out, w):
    """A scalar loss sum(out * w) whose gradient w.r.t. out is w (any upstream gradient)."""
    return float((out * w).sum())


def test_rmsnorm_backward():
    x, g = RNG.normal(size=(2, 3, 5)), RNG.normal(size=5)
    w = RNG.normal(size=(2, 3, 5))
    out, cache = ops.rmsnorm_forward(x, g, 1e-5)
    dx, dg = ops.rmsnorm_backward(w, cache)
    check_op(lambda: weighted(ops.rmsnorm_forward(x, g, 1e-5)[0], w), [dx, dg], [x, g])


def test_rmsnorm_forward_normalises():
    x = RNG.normal(size=(4, 16)) * 7
    out, _ = ops.rmsnorm_forward(x, np.ones(16), 1e-5)
    np.testing.assert_allclose(np.sqrt((out ** 2).mean(-1)), 1.0, rtol=1e-4)


def test_layernorm_backward():
    x, g, b = RNG.normal(size=(2, 3, 5)) * 3 + 1, RNG.normal(size=5), RNG.normal(size=5)
    w = RNG.normal(size=(2, 3, 5))
    out, cache = ops.layernorm_forward(x, g, b, 1e-5)
    dx, dg, db = ops.layernorm_backward(w, cache)
    check_op(lambda: weighted(ops.layernorm_forward(x, g, b, 1e-5)[0], w), [dx, dg, db],
             [x, g, b])


def test_layernorm_forward_centres_and_normalises():
    x = RNG.normal(size=(4, 16)) * 7 + 3
    out, _ = ops.layernorm_forward(x, np.ones(16), np.zeros(16), 1e-5)
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.std(-1), 1.0, rtol=1e-4)
    shifted, _ = ops.layernorm_forward(x, np.full(16, 2.0), np.full(16, 0.5), 1e-5)
    np.testing.assert_allclose(shifted, 2 * out + 0.5, rtol=1e-12, atol=1e-12)


def test_linear_bias_backward():
    x, W, b = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(4, 6)), RNG.normal(size=6)
    w = RNG.normal(size=(2, 3, 6))
    out, cache = ops.linear_bias_forward(x, W, b)
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-12)
    dx, dW, db = ops.linear_bias_backward(w, cache)
    check_op(lambda: weighted(ops.linear_bias_forward(x, W, b)[0], w), [dx, dW, db], [x, W, b])


def test_gelu_backward_and_formula():
    x = np.concatenate([RNG.normal(size=(3, 8)) * 2, [[-6, -3, -1e-3, 0, 1e-3, 0.5, 3, 6]]])
    w = RNG.normal(size=x.shape)
    out, cache = ops.gelu_forward(x)
    # GPT-2's gelu_new, written out independently
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * np.power(x, 3))))
    np.testing.assert_allclose(out, want, rtol=1e-14, atol=1e-16)
    assert out[-1, 3] == 0 and abs(out[-1, -1] - 6) < 1e-6 and abs(out[-1, 0]) < 1e-6
    check_op(lambda: weighted(ops.gelu_forward(x)[0], w), list(ops.gelu_backward(w, cache)),
             [x])


def test_linear_backward():
    x, W, w = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(4, 6)), RNG.normal(size=(2, 3, 6))
    out, cache = ops.linear_forward(x, W)
    dx, dW = ops.linear_backward(w, cache)
    check_op(lambda: weighted(ops.linear_forward(x, W)[0], w), [dx, dW], [x, W])


def test_embedding_backward():
    wte, wpe = RNG.normal(size=(7, 4)), RNG.normal(size=(5, 4))
    idx = np.array([[1, 3, 3, 0], [6, 1, 2, 3]])      # repeated ids must accumulate
    w = RNG.normal(size=(2, 4, 4))
    out, cache = ops.embedding_forward(wte, wpe, idx)
    none, dwte, dwpe = ops.embedding_backward(w, cache)
    assert none is None                                  # ids have no gradient
    check_op(lambda: weighted(ops.embedding_forward(wte, wpe, idx)[0], w), [dwte, dwpe],
             [wte, wpe])
    assert np.all(dwpe[4] == 0) and np.all(dwte[4] == 0)   # unused position / token


@pytest.mark.parametrize("T,H", [(1, 1), (5, 2), (6, 3)])
def test_attention_backward(T, H):
    C = 3 * H
    qkv, w = RNG.normal(size=(2, T, 3 * C)), RNG.normal(size=(2, T, C))
    out, cache = ops.attention_forward(qkv, H)
    dqkv, = ops.attention_backward(w, cache)
    check_op(lambda: weighted(ops.attention_forward(qkv, H)[0], w), [dqkv], [qkv])


def test_attention_is_causal():
    qkv = RNG.normal(size=(1, 6, 12))
    out, _ = ops.attention_forward(qkv, 2)
    changed = qkv.copy()
    changed[0, 4:] += 10.0                                 # change the future only
    out2, _ = ops.attention_forward(changed, 2)
    np.testing.assert_array_equal(out[0, :4], out2[0, :4])
    assert not np.allclose(out[0, 4:], out2[0, 4:])


def test_squared_relu_backward():
    x = RNG.normal(size=(3, 8))
    x[np.abs(x) < 1e-3] = 0.5                              # keep finite differences off the kink
    w = RNG.normal(size=(3, 8))
    out, cache = ops.squared_relu_forward(x)
    np.testing.assert_allclose(out, np.maximum(x, 0) ** 2)
    check_op(lambda: weighted(ops.squared_relu_forward(x)[0], w),
             list(ops.squared_relu_backward(w, cache)), [x])


def test_dropout_backward_uses_same_mask():
    x, w = RNG.normal(size=(4, 50)), RNG.normal(size=(4, 50))
    out, mask = ops.dropout_forward(x, 0.3, np.random.default_rng(3))
    zeroed = (mask == 0).mean()
    assert 0.15 < zeroed < 0.45 and np.allclose(mask[mask > 0], 1 / 0.7)
    dx = ops.dropout_backward(w, mask)
    check_op(lambda: weighted(ops.dropout_forward(x, 0.3, np.random.default_rng(3))[0], w),
             [dx], [x])
    same, none = ops.dropout_forward(x, 0.0, np.random.default_rng(3))
    assert same is x and none is None


def test_dropout_mask_is_a_fair_independent_coin():
    # 2^20 elements: the binomial standard deviation of a fraction is at most 5e-4
    n, sd = 1 << 20, 0.5 / 2 ** 10
    for p in (0.1, 0.5):
        a = ops.dropout_keep((1, 2), (n,), p, np)
        b = ops.dropout_keep((1, 3), (n,), p, np)        # another key: another, unrelated mask
        q = 1 - p
        assert abs(a.mean() - q) < 5 * sd
        assert abs((a[1:] & a[:-1]).mean() - q * q) < 5 * sd          # neighbours independent
        assert abs((a[64:] & a[:-64]).mean() - q * q) < 5 * sd        # and a row apart
        assert abs((a & b).mean() - q * q) < 5 * sd                   # masks independent
    np.testing.assert_array_equal(ops.dropout_keep((7, 9), (3, 5), 0.3, np),
                                  ops.dropout_keep((7, 9), (15,), 0.3, np).reshape(3, 5))


def test_dropout_key_comes_from_the_generator():
    rng = np.random.default_rng(11)
    first, second = ops.dropout_key(rng), ops.dropout_key(rng)
    assert first != second and first == ops.dropout_key(np.random.default_rng(11))
    assert all(0 <= k < 1 << 32 for k in first + second)
    assert ops.dropout_threshold(0.25) == 1 << 30 and ops.dropout_threshold(0.0) == 0


def test_residual_dropout_is_the_composition():
    x, f, w = RNG.normal(size=(3, 40)), RNG.normal(size=(3, 40)), RNG.normal(size=(3, 40))
    out, mask = ops.residual_dropout_forward(x, f, 0.4, np.random.default_rng(2))
    dropped, mask2 = ops.dropout_forward(f, 0.4, np.random.default_rng(2))
    np.testing.assert_array_equal(out, x + dropped)
    np.testing.assert_array_equal(mask, mask2)
    dx, df = ops.residual_dropout_backward(w, mask)
    check_op(lambda: weighted(ops.residual_dropout_forward(
        x, f, 0.4, np.random.default_rng(2))[0], w), [dx, df], [x, f])


def test_residual_without_dropout_is_the_sum():
    x, f, w = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3))
    for p, rng in ((0.0, np.random.default_rng(2)), (0.4, None)):   # p = 0 or no generator
        out, cache = ops.residual_dropout_forward(x, f, p, rng)
        np.testing.assert_array_equal(out, x + f)
        dx, df = ops.residual_dropout_backward(w, cache)
        check_op(lambda: weighted(ops.residual_dropout_forward(x, f, 0.0, None)[0], w),
                 [dx, df], [x, f])


def test_cross_entropy_backward():
    logits, targets = RNG.normal(size=(2, 3, 6)) * 3, RNG.integers(0, 6, size=(2, 3))
    loss, cache = ops.cross_entropy_forward(logits, targets)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.log(p[np.arange(2)[:, None], np.arange(3)[None], targets]).mean()
    assert abs(loss - expected) < 1e-12
    dlogits, = ops.cross_entropy_backward(1.0, cache)
    assert dlogits.shape == logits.shape
    check_op(lambda: float(ops.cross_entropy_forward(logits, targets)[0]), [dlogits], [logits])


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0]]], dtype=np.float32)
    loss, _ = ops.cross_entropy_forward(logits, np.array([[0]]))
    assert np.isfinite(loss) and loss < 1e-6


def test_cross_entropy_backward_scales_by_dloss_and_skips_ignored_targets():
    logits, targets = RNG.normal(size=(2, 3, 6)) * 3, RNG.integers(0, 6, size=(2, 3))
    targets[1, 1:] = -1                                    # padding: out of loss and gradient
    loss, cache = ops.cross_entropy_forward(logits, targets)
    dlogits, = ops.cross_entropy_backward(2.5, cache)
    check_op(lambda: 2.5 * float(ops.cross_entropy_forward(logits, targets)[0]), [dlogits],
             [logits])
    assert np.all(dlogits[1, 1:] == 0)


# --------------------------------------------------------------------------------------------
# The forward-only ops

@pytest.mark.parametrize("lengths", [[1, 4, 7], [7, 7, 2]])
def test_kv_attention_is_attention_of_the_newest_position(lengths):
    # stream s: its first lengths[s] positions through causal attention; the last row of that
    # is kv_attention of its newest query over the cached keys and values (the rest unused)
    S, H, hs, T = 3, 2, 4, 7
    qkv = RNG.normal(size=(S, T, 3 * H * hs))
    heads = lambda i: qkv[:, :, i * H * hs:(i + 1) * H * hs].reshape(S, T, H, hs).transpose(
        0, 2, 1, 3)                                          # (S, H, T, hs)
    q, k, v = heads(0), heads(1), heads(2)
    newest = np.array(lengths) - 1
    y = ops.kv_attention_forward(q[np.arange(S), :, newest], k, v, np.array(lengths))
    assert y.shape == (S, H * hs)
    for s, n in enumerate(lengths):
        full, _ = ops.attention_forward(qkv[s:s + 1, :n], H)
        np.testing.assert_allclose(y[s], full[0, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_update_matches_formula(weight_decay):
    p, m, v = RNG.normal(size=12), np.zeros(12), np.zeros(12)
    mask = (np.arange(12) < 8).astype(np.float64)          # the last four: no decay
    want, wm, wv = p.copy(), m.copy(), v.copy()
    for t in range(1, 5):
        g = RNG.normal(size=12)
        ops.adamw_update(p, g, m, v, mask, 0.01 * t, 0.9, 0.95, 1e-8, weight_decay, t)
        wm, wv = 0.9 * wm + 0.1 * g, 0.95 * wv + 0.05 * g * g
        mhat, vhat = wm / (1 - 0.9 ** t), wv / (1 - 0.95 ** t)
        want = want - 0.01 * t * (mhat / (np.sqrt(vhat) + 1e-8) + weight_decay * mask * want)
    np.testing.assert_allclose(p, want, rtol=1e-12)
    np.testing.assert_allclose(m, wm, rtol=1e-12)
    np.testing.assert_allclose(v, wv, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The backend contract

@pytest.mark.parametrize("name", list(contract.BACKENDS))
def test_every_registered_backend_provides_every_op(name):
    # the cupy backend with NumPy standing in for CuPy: the same table, no GPU needed
    backend = contract.get_backend(name, **({"xp": np} if name == "cupy" else {}))
    assert backend.name == name and contract.get_backend(backend) is backend
    for op in contract.OP_NAMES:
        assert callable(getattr(backend, op)) and getattr(backend.ops, op) is getattr(backend, op)
    assert backend.own <= set(contract.OP_NAMES)


def test_a_backend_from_an_empty_table_is_the_reference():
    for source in ({}, types.SimpleNamespace()):
        backend = contract.make_backend("empty", source)
        assert backend.own == frozenset()
        for op in contract.OP_NAMES:
            assert getattr(backend, op) is getattr(ops, op)
    assert contract.get_backend("reference").own == frozenset()


def test_a_backend_with_one_op_uses_it_and_the_reference_for_the_rest():
    calls = []

    def squared_relu_forward(x):
        calls.append(x.shape)
        return ops.squared_relu_forward(x)

    module = types.ModuleType("one_op")
    module.squared_relu_forward = squared_relu_forward
    module.not_an_op = lambda: None                        # ignored: not in the contract
    backend = contract.make_backend("one", module, {"knob": 1})
    assert backend.own == {"squared_relu_forward"} and backend.options == {"knob": 1}
    out, cache = backend.squared_relu_forward(np.ones((2, 3)))
    assert calls == [(2, 3)] and backend.squared_relu_backward is ops.squared_relu_backward
    assert not hasattr(backend.ops, "not_an_op")
    for op in set(contract.OP_NAMES) - {"squared_relu_forward"}:
        assert getattr(backend, op) is getattr(ops, op)
    with pytest.raises(AttributeError):
        backend.no_such_op


def test_unknown_backend_and_reference_options_are_user_errors():
    with pytest.raises(UserError) as e:
        contract.get_backend("tpu")
    assert e.value.field == "backend" and "'tpu'" in str(e.value)
    with pytest.raises(UserError):
        contract.get_backend("reference", own_sgemm=False)
