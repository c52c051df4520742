"""evaluate_text: loss per token, perplexity and bits per character over a whole text."""
import math

import numpy as np
import pytest

from randygpt.config import ModelConfig
from randygpt.errors import UserError
from randygpt.evaluate import evaluate_text, token_nats
from randygpt.model import GPT
from randygpt.tokenizer import CharTokenizer

TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n")
TOK = CharTokenizer(TEXT)


def make_model(block=16, vocab=TOK.vocab_size, seed=0):
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_embd=32, n_head=4,
                      dropout=0.0)
    model = GPT(cfg, seed=seed)
    model.params.flat[...] *= 10         # far from uniform predictions
    return model


def brute_force_nats(model, tok, text):
    """-log p of each text token, one forward pass per window, via the model's own loss."""
    stream = [tok.bos_id] + tok.encode(text).tolist()
    T, total = model.cfg.block_size, 0.0
    for a in range(0, len(stream) - 1, T):
        x = np.array([stream[a:a + T]])
        y = np.array([stream[a + 1:a + T + 1]])
        x = x[:, :y.shape[1]]
        total += model.loss(x, y) * y.shape[1]
    return total


def test_matches_the_models_own_loss_window_by_window():
    model = make_model()
    r = evaluate_text(model, TOK, TEXT)
    assert r.tokens == r.chars == len(TEXT)
    assert r.windows == math.ceil(len(TEXT) / 16)
    assert r.total_nats == pytest.approx(brute_force_nats(model, TOK, TEXT), rel=1e-5)
    assert r.loss == pytest.approx(r.total_nats / len(TEXT), rel=1e-12)
    assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-12)
    assert r.bits_per_char == pytest.approx(r.loss / math.log(2), rel=1e-12)   # char model


@pytest.mark.parametrize("n_chars", [1, 15, 16, 17, 32, 33])
def test_every_token_is_predicted_once_for_any_length(n_chars):
    model = make_model()
    text = TEXT[:n_chars]
    r = evaluate_text(model, TOK, text)
    assert r.tokens == n_chars and r.windows == math.ceil(n_chars / 16)
    assert r.total_nats == pytest.approx(brute_force_nats(model, TOK, text), rel=1e-5)


def test_uniform_model_has_loss_ln_v():
    model = make_model()
    model.params["lm_head"][...] = 0.0                    # every logit 0: p = 1 / V
    r = evaluate_text(model, TOK, TEXT)
    V = TOK.vocab_size
    assert r.loss == pytest.approx(math.log(V), rel=1e-12)
    assert r.perplexity == pytest.approx(V, rel=1e-10)
    assert r.bits_per_char == pytest.approx(math.log2(V), rel=1e-12)


def test_batching_windows_does_not_change_the_result():
    model = make_model()
    one = evaluate_text(model, TOK, TEXT * 3, batch_windows=1)
    many = evaluate_text(model, TOK, TEXT * 3, batch_windows=7)
    assert one.total_nats == pytest.approx(many.total_nats, rel=1e-6)


def test_bits_per_char_counts_characters_not_tokens_for_bpe():
    tokenizers = pytest.importorskip("tokenizers")  # noqa: F841
    from randygpt.tokenizer import BPETokenizer
    bpe = BPETokenizer.train(TEXT * 4, vocab_size=300)
    model = make_model(vocab=bpe.vocab_size)
    r = evaluate_text(model, bpe, TEXT)
    n_tokens = len(bpe.encode(TEXT))
    assert r.tokens == n_tokens < len(TEXT) == r.chars
    assert r.bits_per_char == pytest.approx(r.loss * n_tokens / len(TEXT) / math.log(2),
                                            rel=1e-12)


def test_bad_text_is_a_user_error():
    model = make_model()
    with pytest.raises(UserError, match="empty"):
        evaluate_text(model, TOK, "")
    with pytest.raises(UserError, match="'@'"):
        evaluate_text(model, TOK, "Now @ once")


# ------------------------------------------------------------------------------------------
# documents (framed as training frames them) and sliding windows

def full_context_nats(model, ids):
    """-log p of each target of ids with the longest context the block allows: one forward
    pass per target."""
    T, total = model.cfg.block_size, 0.0
    for j in range(1, len(ids)):
        x = np.array([ids[max(0, j - T):j]])
        nats = token_nats(model, x, np.array([ids[max(0, j - T) + 1:j + 1]]))
        total += float(nats[0, -1])
    return total


def test_documents_are_scored_bos_doc_eos_each_target_once():
    from randygpt.data import encode_documents, split_text
    model = make_model()
    text = "ab\ncde\n" + "the winter of our discontent made glorious\n" + "w\n"
    r = evaluate_text(model, TOK, text, separator="\n")
    docs = split_text(text, "\n")
    framed = encode_documents(docs, TOK, progress=False)
    assert r.tokens == framed.n_targets == sum(len(d) + 1 for d in docs)   # EOS predicted too
    assert r.chars == sum(len(d) for d in docs)
    want = 0.0
    for d in range(framed.n_docs):
        ids = framed.tokens[framed.bounds[d]:framed.bounds[d + 1]].tolist()
        for a in range(0, len(ids) - 1, 16):                   # non-overlapping windows
            x, y = np.array([ids[a:a + 16]]), np.array([ids[a + 1:a + 17]])
            x = x[:, :y.shape[1]]
            want += model.loss(x, y) * y.shape[1]
    assert r.total_nats == pytest.approx(want, rel=1e-5)
    # the plain text of the same characters is another number: the framing matters
    assert evaluate_text(model, TOK, text).total_nats != pytest.approx(r.total_nats, rel=1e-3)


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_sliding_windows_give_each_target_context(stride):
    model = make_model()
    stream = [TOK.bos_id] + TOK.encode(TEXT).tolist()
    r = evaluate_text(model, TOK, TEXT, stride=stride)
    assert r.tokens == len(TEXT)
    if stride == 1:
        assert r.total_nats == pytest.approx(full_context_nats(model, stream), rel=1e-5)
    else:           # more context than non-overlapping windows, and never each token twice
        assert r.windows == 1 + math.ceil((len(TEXT) - 16) / stride)
    with pytest.raises(UserError, match="between 1 and the block size"):
        evaluate_text(model, TOK, TEXT, stride=17)


def test_evaluate_documents_of_a_split_is_exact():
    from randygpt.data import encode_documents
    from randygpt.evaluate import evaluate_documents
    model = make_model()
    docs = encode_documents(["abc", "de", "f" * 40], TOK, progress=False)
    r = evaluate_documents(model, docs, stride=1)
    want = sum(full_context_nats(model, docs.tokens[docs.bounds[d]:docs.bounds[d + 1]].tolist())
               for d in range(docs.n_docs))
    assert r.tokens == 4 + 3 + 41
    assert r.total_nats == pytest.approx(want, rel=1e-5)
