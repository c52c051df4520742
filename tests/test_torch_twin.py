"""The PyTorch twin is the same function as randyGPT's model: the benchmarks compare speed
against it, so it must compute what we compute (float64: logits, loss, every gradient)."""
import numpy as np
import pytest

from randygpt.config import ModelConfig
from randygpt.model import GPT

torch = pytest.importorskip("torch", reason="the PyTorch twin needs torch (test extra)")
from torch_twin import TorchGPT  # noqa: E402


GPT2 = dict(norm="layernorm", activation="gelu", bias=True, tied_head=True)
VARIANTS = {"randygpt": {}, "gpt2": GPT2, "gpt2-untied": dict(GPT2, tied_head=False),
            "layernorm-only": dict(norm="layernorm"), "gelu-bias": dict(activation="gelu",
                                                                        bias=True)}


@pytest.mark.parametrize("backend,variant", [("reference", v) for v in VARIANTS] +
                         [("fused", "randygpt"), ("fused", "gpt2")])
def test_twin_equals_randygpt_in_float64(backend, variant):
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_embd=16, n_head=4, dropout=0.0,
                      **VARIANTS[variant])
    ours = GPT(cfg, seed=3, dtype=np.float64, backend=backend)
    ours.params.flat[...] *= 20                      # far from init: every path matters
    for name, shape in ours.params.shapes:
        if name.endswith(".g"):
            ours.params[name][...] = 1 + np.random.default_rng(4).normal(0, 0.3, shape)
        elif name.endswith(".b"):                    # biases (zero at init) matter too
            ours.params[name][...] = np.random.default_rng(6).normal(0, 0.5, shape)
    twin = TorchGPT.from_randygpt(ours)
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    y[2, 5:] = -1                                    # padding after a short document
    logits, loss = ours.forward(x, y)
    ours.backward()
    t_loss = twin(torch.from_numpy(x), torch.from_numpy(y))
    t_loss.backward()
    assert abs(loss - t_loss.item()) < 1e-12 * abs(loss)
    np.testing.assert_allclose(twin(torch.from_numpy(x)).detach().numpy(), logits,
                               rtol=1e-11, atol=1e-11)
    theirs = twin.grads()
    for name in ours.params.names():
        scale = np.abs(theirs[name]).max()
        assert scale > 0, name
        assert np.abs(ours.grads[name] - theirs[name]).max() <= 1e-10 * scale, name
