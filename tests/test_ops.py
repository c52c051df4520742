"""Every reference op's backward against float64 central finite differences."""
import numpy as np
import pytest

from randygpt.ops import reference as ops
from gradcheck import check_op

RNG = np.random.default_rng(0)


def weighted(out, w):
    """A scalar loss sum(out * w) whose gradient w.r.t. out is w (any upstream gradient)."""
    return float((out * w).sum())


def test_rmsnorm_backward():
    x, g = RNG.normal(size=(2, 3, 5)), RNG.normal(size=5)
    w = RNG.normal(size=(2, 3, 5))
    out, cache = ops.rmsnorm_forward(x, g)
    dx, dg = ops.rmsnorm_backward(w, g, cache)
    check_op(lambda: weighted(ops.rmsnorm_forward(x, g)[0], w), [dx, dg], [x, g])


def test_rmsnorm_forward_normalises():
    x = RNG.normal(size=(4, 16)) * 7
    out, _ = ops.rmsnorm_forward(x, np.ones(16))
    np.testing.assert_allclose(np.sqrt((out ** 2).mean(-1)), 1.0, rtol=1e-4)


def test_linear_backward():
    x, W, w = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(4, 6)), RNG.normal(size=(2, 3, 6))
    dx, dW = ops.linear_backward(w, x, W)
    check_op(lambda: weighted(ops.linear_forward(x, W), w), [dx, dW], [x, W])


def test_embedding_backward():
    wte, wpe = RNG.normal(size=(7, 4)), RNG.normal(size=(5, 4))
    idx = np.array([[1, 3, 3, 0], [6, 1, 2, 3]])      # repeated ids must accumulate
    w = RNG.normal(size=(2, 4, 4))
    dwte, dwpe = ops.embedding_backward(w, idx, 7, 5)
    check_op(lambda: weighted(ops.embedding_forward(wte, wpe, idx), w), [dwte, dwpe], [wte, wpe])
    assert np.all(dwpe[4] == 0) and np.all(dwte[4] == 0)   # unused position / token


@pytest.mark.parametrize("T,H", [(1, 1), (5, 2), (6, 3)])
def test_attention_backward(T, H):
    C = 3 * H
    qkv, w = RNG.normal(size=(2, T, 3 * C)), RNG.normal(size=(2, T, C))
    out, cache = ops.attention_forward(qkv, H)
    dqkv = ops.attention_backward(w, cache)
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
    out, r = ops.squared_relu_forward(x)
    np.testing.assert_allclose(out, np.maximum(x, 0) ** 2)
    check_op(lambda: weighted(ops.squared_relu_forward(x)[0], w),
             [ops.squared_relu_backward(w, r)], [x])


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
        a = ops.dropout_keep((1, 2), (n,), p)
        b = ops.dropout_keep((1, 3), (n,), p)        # another key: another, unrelated mask
        q = 1 - p
        assert abs(a.mean() - q) < 5 * sd
        assert abs((a[1:] & a[:-1]).mean() - q * q) < 5 * sd          # neighbours independent
        assert abs((a[64:] & a[:-64]).mean() - q * q) < 5 * sd        # and a row apart
        assert abs((a & b).mean() - q * q) < 5 * sd                   # masks independent
    np.testing.assert_array_equal(ops.dropout_keep((7, 9), (3, 5), 0.3),
                                  ops.dropout_keep((7, 9), (15,), 0.3).reshape(3, 5))


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


def test_residual_backward():
    x, f, w = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3))
    dx, df = ops.residual_backward(w)
    check_op(lambda: weighted(ops.residual_forward(x, f), w), [dx, df], [x, f])


def test_cross_entropy_backward():
    logits, targets = RNG.normal(size=(2, 3, 6)) * 3, RNG.integers(0, 6, size=(2, 3))
    loss, cache = ops.cross_entropy_forward(logits, targets)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.log(p[np.arange(2)[:, None], np.arange(3)[None], targets]).mean()
    assert abs(loss - expected) < 1e-12
    dlogits = ops.cross_entropy_backward(cache, logits.shape)
    check_op(lambda: float(ops.cross_entropy_forward(logits, targets)[0]), [dlogits], [logits])


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0]]], dtype=np.float32)
    loss, _ = ops.cross_entropy_forward(logits, np.array([[0]]))
    assert np.isfinite(loss) and loss < 1e-6
