"""The whole model's gradient, every parameter tensor, against float64 finite differences."""
import numpy as np
import pytest

from randygpt.config import ModelConfig
from randygpt.model import GPT, count_parameters, parameter_shapes
from gradcheck import check_model_gradient, rel_error

CFG = dict(vocab_size=9, block_size=6, n_layer=2, n_embd=8, n_head=2, dropout=0.25)


GPT2 = dict(norm="layernorm", activation="gelu", bias=True, tied_head=True)
# the architecture's variants: randyGPT's own, GPT-2's, and each GPT-2 part alone
VARIANTS = {"randygpt": {}, "gpt2": GPT2, "layernorm": dict(norm="layernorm"),
            "gelu": dict(activation="gelu"), "bias": dict(bias=True),
            "tied_head": dict(tied_head=True)}


def rough_model(dtype, seed=0, **variant):
    """A tiny model with large random weights (std 0.5, gains != 1) so that every nonlinearity
    and every path carries gradient well above finite-difference round-off."""
    m = GPT(ModelConfig(**CFG, **variant), seed=None, dtype=dtype)
    rng = np.random.default_rng(seed)
    for name, shape in m.params.shapes:
        base = 1.0 if name.endswith(".g") else 0.0
        m.params[name][...] = base + rng.normal(0, 0.5, shape)
    return m


def batch(seed=1, B=3, T=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG["vocab_size"], (B, T)), rng.integers(0, CFG["vocab_size"], (B, T))


def test_parameter_count_matches_seed_small_config():
    # the seed's v0.5 "small" config with the 65-char Shakespeare vocabulary (+BOS/EOS)
    n = count_parameters(ModelConfig(vocab_size=67, block_size=64, n_layer=6, n_embd=128,
                                     n_head=8))
    assert 1.15e6 < n < 1.25e6
    assert [s for _, s in parameter_shapes(ModelConfig(**CFG))][:2] == [(9, 8), (6, 8)]


@pytest.mark.parametrize("variant,with_dropout", [("randygpt", False), ("randygpt", True)] +
                         [(v, v == "gpt2") for v in VARIANTS if v != "randygpt"])
def test_whole_model_gradient_matches_finite_differences(variant, with_dropout):
    m = rough_model(np.float64, **VARIANTS[variant])
    x, y = batch()

    def loss():   # the same dropout masks on every call: a fresh generator with a fixed seed
        return m.forward(x, y, rng=np.random.default_rng(7) if with_dropout else None)[1]

    loss()
    m.backward()
    check_model_gradient(m, loss)


@pytest.mark.parametrize("variant", ["randygpt", "gpt2"])
def test_float32_agrees_with_float64(variant):
    m64 = rough_model(np.float64, **VARIANTS[variant])
    m32 = rough_model(np.float32, **VARIANTS[variant])
    x, y = batch()
    l64 = m64.forward(x, y, rng=np.random.default_rng(7))[1]
    l32 = m32.forward(x, y, rng=np.random.default_rng(7))[1]
    assert abs(l64 - l32) / l64 < 1e-5
    m64.backward()
    m32.backward()
    assert m32.grads.flat.dtype == np.float32
    for name, _ in m64.params.shapes:
        assert rel_error(m32.grads[name], m64.grads[name]) < 1e-4, name


def test_gpt2_init():
    m = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=4, n_embd=64, n_head=4), seed=0)
    assert m.params.flat.dtype == np.float32
    assert abs(m.params["h.0.mlp.fc"].std() - 0.02) < 0.002
    assert abs(m.params["h.0.attn.proj"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert np.all(m.params["h.3.ln2.g"] == 1.0) and np.all(m.params["ln_f.g"] == 1.0)
    mask = m.decay_mask()
    a, b = m.params.offsets["h.0.ln1.g"]
    assert mask[a:b].sum() == 0 and mask[m.params.offsets["wte"][0]] == 1


def test_loss_starts_near_log_vocab():
    m = GPT(ModelConfig(vocab_size=67, block_size=16, n_layer=2, n_embd=32, n_head=4), seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 67, (4, 16))
    assert abs(m.loss(x, x) - np.log(67)) < 0.1


def test_block_size_is_enforced():
    m = GPT(ModelConfig(**CFG), seed=0)
    with pytest.raises(ValueError, match="block_size"):
        m.forward(np.zeros((1, 7), dtype=np.int64))


def test_gpt2_variant_parameters_and_init():
    cfg = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_embd=64, n_head=4, **GPT2)
    names = [n for n, _ in parameter_shapes(cfg)]
    assert "lm_head" not in names and names[-2:] == ["ln_f.g", "ln_f.b"]
    assert names[2:7] == ["h.0.ln1.g", "h.0.ln1.b", "h.0.attn.qkv", "h.0.attn.qkv.b",
                          "h.0.attn.proj"]
    # GPT-2 124M's count at 1024 positions and its 50257-token vocabulary
    assert count_parameters(ModelConfig(vocab_size=50257, block_size=1024, n_layer=12,
                                        n_embd=768, n_head=12, **GPT2)) == 124_439_808
    m = GPT(cfg, seed=0)
    assert np.all(m.params["h.1.mlp.fc.b"] == 0) and np.all(m.params["ln_f.b"] == 0)
    mask = m.decay_mask()
    for name in ("h.0.attn.qkv.b", "h.0.ln1.b"):
        a, b = m.params.offsets[name]
        assert mask[a:b].sum() == 0, name


def test_tied_head_is_the_embedding_transposed():
    m = rough_model(np.float64, tied_head=True)
    x, y = batch()
    logits, _ = m.forward(x, y)
    xf, _ = m.norm_forward(m.block_forward(m.block_forward(
        m.ops.embedding_forward(m.params["wte"], m.params["wpe"], x)[0], 0)[0], 1)[0], "ln_f")
    np.testing.assert_allclose(logits, xf @ m.params["wte"].T, rtol=1e-12)
