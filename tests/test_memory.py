"""The memory estimate is close to what a training step really allocates, and a run that
cannot fit is refused before it allocates."""
import tracemalloc

import numpy as np
import pytest

from randygpt.config import ModelConfig, TrainConfig
from randygpt.errors import UserError
from randygpt.memory import available_bytes, check_memory, estimate_training_bytes
from randygpt.model import GPT
from randygpt.ops.contract import get_backend
from randygpt.step import make_optimizer, train_step


@pytest.mark.parametrize("shape", [
    dict(block_size=64, n_layer=2, n_embd=64, n_head=4, vocab_size=65, batch=16),
    dict(block_size=128, n_layer=1, n_embd=32, n_head=8, vocab_size=300, batch=8),
    dict(block_size=16, n_layer=3, n_embd=96, n_head=2, vocab_size=2000, batch=32),
])
def test_estimate_is_within_a_factor_of_the_measured_peak(shape):
    B = shape.pop("batch")
    mcfg, tcfg = ModelConfig(dropout=0.1, **shape), TrainConfig(batch_size=B)
    est = estimate_training_bytes(mcfg, tcfg)
    tracemalloc.start()
    backend = get_backend("reference")
    model = GPT(mcfg, seed=0, backend=backend)
    opt = make_optimizer(model, tcfg, backend)
    rng = np.random.default_rng(0)
    x = rng.integers(0, mcfg.vocab_size, size=(B, mcfg.block_size))
    train_step(model, opt, x, x, 1e-3, grad_clip=1.0, dropout_rng=rng)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert 0.6 < est.total / peak < 1.7, (est, peak)


def test_a_run_that_cannot_fit_is_refused_with_the_estimate():
    mcfg = ModelConfig(vocab_size=65, block_size=100000, n_layer=6, n_embd=128, n_head=8)
    est = estimate_training_bytes(mcfg, TrainConfig(batch_size=32))
    with pytest.raises(UserError, match=r"needs about .* GiB .* available"):
        check_memory(est, available=8 << 30)
    check_memory(estimate_training_bytes(ModelConfig(vocab_size=65), TrainConfig()),
                 available=8 << 30)
    assert available_bytes() is None or available_bytes() > 0
