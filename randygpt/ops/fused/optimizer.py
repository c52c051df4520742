"""AdamW in one parallel pass over the flat buffers (instead of ~10 NumPy passes); its
readable twin is reference.adamw_update, and optim.AdamW calls either through a backend."""
import math

from numba import prange

from .jit import pjit


# m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
# p -= lr * (m * m_hat_scale / (sqrt(v * v_hat_scale) + eps) + wd * mask * p)

@pjit
def _adamw(params, grad, m, v, decay_mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
           eps, weight_decay, m_hat_scale, v_hat_scale):
    # every array (N,) of one dtype; every scalar already of that dtype
    for i in prange(params.size):
        grad_i = grad[i]
        mi = beta1 * m[i] + one_minus_beta1 * grad_i
        vi = beta2 * v[i] + one_minus_beta2 * grad_i * grad_i
        m[i] = mi
        v[i] = vi
        update = (mi * m_hat_scale) / (math.sqrt(vi * v_hat_scale) + eps)
        params[i] -= lr * (update + weight_decay * decay_mask[i] * params[i])


def adamw_update(params, grad, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, t):
    # the contract's signature; the kernel takes every scalar in the params' dtype, with
    # 1 - beta and the bias corrections 1 / (1 - beta^t) computed here
    dt = params.dtype.type
    _adamw(params, grad, m, v, decay_mask, dt(lr), dt(beta1), dt(1 - beta1), dt(beta2),
           dt(1 - beta2), dt(eps), dt(weight_decay), dt(1.0 / (1 - beta1 ** t)),
           dt(1.0 / (1 - beta2 ** t)))
