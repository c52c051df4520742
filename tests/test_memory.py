"""The memory estimate of a training run (randygpt/memory.py): its parts, that it tracks what a
real step allocates, and the refusals and default batches built on it."""
import tracemalloc

import numpy as np
import pytest

from randygpt.config import ModelConfig, TrainConfig
from randygpt.errors import UserError
from randygpt.memory import GiB, check_fits, fitting_batch, training_memory
from randygpt.model import GPT, count_parameters
from randygpt.step import make_optimizer

GPT2_124M = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_embd=768, n_head=12,
                        norm="layernorm", activation="gelu", bias=True, tied_head=True)


def test_parts_of_the_gpt2_estimate():
    est = training_memory(GPT2_124M, 8)
    assert est.parts["weights/grads/AdamW"] == 5 * 124_439_808 * 4
    assert est.parts["logits"] == 2 * 50257 * 8 * 1024 * 4
    two = training_memory(GPT2_124M, 16)
    # everything but the per-parameter part grows with the batch
    assert two.total - est.total == est.total - training_memory(GPT2_124M, 0).total
    assert training_memory(GPT2_124M, 8, "reference").total > est.total
    assert est.parts["runtime"] == 256 << 20
    assert "GiB" in est.describe() and est.describe().count("+") == len(est.parts) - 1


@pytest.mark.parametrize("variant", [{}, dict(norm="layernorm", activation="gelu", bias=True,
                                              tied_head=True)], ids=["randygpt", "gpt2"])
def test_estimate_tracks_what_a_reference_step_allocates(variant):
    # tracemalloc sees NumPy's allocations; the reference backend keeps no buffer pool
    cfg = ModelConfig(vocab_size=2000, block_size=128, n_layer=4, n_embd=64, n_head=4,
                      dropout=0.0, **variant)
    tracemalloc.start()
    try:
        m = GPT(cfg, seed=0, backend="reference")
        opt = make_optimizer(m, TrainConfig(), m.backend)
        x = np.random.default_rng(0).integers(0, 2000, (8, 128))
        m.forward(x, x)
        m.backward()
        opt.step(m.grads.flat, 1e-3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ratio = training_memory(cfg, 8, "reference").total / peak
    assert 0.85 < ratio < 1.3, ratio


def test_a_run_that_cannot_fit_is_refused_with_the_estimate():
    est = training_memory(GPT2_124M, 32)
    with pytest.raises(UserError) as e:
        check_fits(est, available=8 * GiB)
    assert e.value.field == "batch_size" and est.describe() in str(e.value)
    check_fits(est, available=est.total)                  # exactly enough: allowed


def test_default_fine_tune_batch_fits_24_gib():
    batch = fitting_batch(GPT2_124M, 32, budget=24 * GiB)
    assert training_memory(GPT2_124M, batch).total <= 24 * GiB
    assert training_memory(GPT2_124M, 2 * batch).total > 24 * GiB and batch >= 4
    small = ModelConfig(vocab_size=67)
    assert fitting_batch(small, 32, budget=24 * GiB) == 32       # small models: unchanged
    assert count_parameters(GPT2_124M) == 124_439_808


def test_train_prints_the_estimate_and_refuses_before_allocating(monkeypatch):
    from randygpt import memory, train
    from randygpt.runs import plan_run
    plan = plan_run(dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4,
                         iters=1), text="hello world " * 50, out_dir=None, runs_dir=None)
    lines = []
    run = train.prepare(plan, backend="reference", log=lines.append)
    assert any(line.startswith("memory: about ") and "GiB" in line for line in lines)
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    allocated = []
    monkeypatch.setattr(train, "GPT", lambda *a, **k: allocated.append(1))
    with pytest.raises(UserError, match="only 0.00 GiB is available"):
        train.prepare(plan, backend="reference", log=lines.append)
    assert not allocated and run.model is not None
