"""Sampling rules, stop strings and incremental detokenizing (no model needed)."""
import math

import numpy as np
import pytest

from randygpt.errors import UserError
from hypothesis import given, settings
from hypothesis import strategies as st

from randygpt.sample import Detokenizer, SamplingConfig, StopFilter, sample_token, sample_tokens


def frequencies(logits, sampling, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.bincount([sample_token(logits, sampling, rng) for _ in range(n)],
                         minlength=len(logits))
    return counts / n


def assert_matches(freq, probs, n=20000):
    # each count is binomial: allow 5 standard deviations (fixed seed, so deterministic)
    sd = np.sqrt(np.asarray(probs) * (1 - np.asarray(probs)) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sd + 1e-12), (freq, probs)


LOGITS = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    logits = np.array([0.1, 2.0, -1.0, 1.9], dtype=np.float32)
    assert all(sample_token(logits, SamplingConfig(temperature=0), rng) == 1 for _ in range(50))


def test_temperature_one_samples_the_softmax():
    assert_matches(frequencies(LOGITS, SamplingConfig()), [0.4, 0.3, 0.2, 0.1])


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        p = np.array([0.4, 0.3, 0.2, 0.1]) ** (1 / t)
        assert_matches(frequencies(LOGITS, SamplingConfig(temperature=t)), p / p.sum())


def test_top_k_keeps_the_k_likeliest_renormalised():
    freq = frequencies(LOGITS, SamplingConfig(top_k=2))
    assert freq[2] == 0 and freq[3] == 0
    assert_matches(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0])
    rng = np.random.default_rng(1)
    assert all(sample_token(LOGITS, SamplingConfig(temperature=5.0, top_k=1), rng) == 0
               for _ in range(50))


def test_top_k_keeps_ties_at_the_kth_logit():
    logits = np.array([3.0, 1.0, 1.0, 0.0])
    freq = frequencies(logits, SamplingConfig(top_k=2), n=5000)
    assert freq[1] > 0 and freq[2] > 0 and freq[3] == 0


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    # cumulative mass 0.4, 0.7, 0.9, 1.0
    freq = frequencies(LOGITS, SamplingConfig(top_p=0.65))
    assert_matches(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0])
    freq = frequencies(LOGITS, SamplingConfig(top_p=0.85))
    assert_matches(freq, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0])
    freq = frequencies(LOGITS, SamplingConfig(top_p=0.3))     # the top token alone
    assert freq[0] == 1.0


def test_order_is_temperature_then_top_k_then_top_p():
    # top-k 3 first renormalises to 4/9, 3/9, 2/9; top-p 0.75 then keeps 2 tokens (7/9).
    # (top-p first on the original mass would keep 3 tokens: 0.4 + 0.3 < 0.75.)
    freq = frequencies(LOGITS, SamplingConfig(top_k=3, top_p=0.75))
    assert_matches(freq, [4 / 7, 3 / 7, 0, 0])
    # temperature before top-p: at T = 0.5 the mass is 16/30, 9/30, 4/30, 1/30,
    # so top-p 0.8 keeps two tokens (0.833), where at T = 1 it would keep three.
    freq = frequencies(LOGITS, SamplingConfig(temperature=0.5, top_p=0.8))
    assert_matches(freq, [16 / 25, 9 / 25, 0, 0])


def test_same_seed_same_draws_and_other_seed_differs():
    s = SamplingConfig(temperature=1.0, top_k=3, top_p=0.95)
    logits = np.random.default_rng(5).standard_normal(50).astype(np.float32)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample_token(logits, s, rng) for _ in range(40)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_masked_tokens_are_never_drawn_even_at_the_top_of_the_range():
    class AlmostOne:                       # rng.random() at its largest value below 1
        def random(self):
            return 1.0 - 2.0 ** -53
    logits = np.array([1.0, 0.5, -3.0, -4.0])
    assert sample_token(logits, SamplingConfig(top_k=2), AlmostOne()) == 1
    assert sample_token(logits, SamplingConfig(), AlmostOne()) == 3
    # and so for many streams at once
    assert sample_tokens([logits] * 4, [SamplingConfig(top_k=2)] * 2 + [SamplingConfig()] * 2,
                         [AlmostOne()] * 4) == [1, 1, 3, 3]


@settings(max_examples=300, deadline=None)
@given(st.integers(4, 40), st.integers(2, 90), st.integers(0, 2**31), st.data())
def test_sampling_many_streams_at_once_draws_what_each_draws_alone(S, V, seed, data):
    # sample_tokens (whole-array, the Session's path for 4+ streams) against sample_token
    # row by row: every row its own settings (greedy, top-k at 1, V-1, V and beyond, top-p
    # down to one token), logits with ties and of very different scales, the same seeds
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((S, V)) * rng.choice([0.01, 1.0, 8.0, 60.0], size=(S, 1))
    logits[rng.random(S) < 0.3, : V // 2] = 0.5                       # tied runs
    logits = logits.astype(np.float32)
    settings_ = [SamplingConfig(temperature=data.draw(st.sampled_from([0, 0.3, 1.0, 1.7])),
                                top_k=data.draw(st.sampled_from([0, 1, 3, V - 1, V, V + 5])),
                                top_p=data.draw(st.sampled_from([1.0, 0.95, 0.5, 1e-3])))
                 for _ in range(S)]
    seeds = rng.integers(0, 2**31, S)
    alone = [sample_token(logits[i], settings_[i], np.random.default_rng(seeds[i]))
             for i in range(S)]
    together = sample_tokens(list(logits), settings_, [np.random.default_rng(x) for x in seeds])
    assert together == alone


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(top_k=-2), "top_k")])
def test_bad_sampling_settings_are_user_errors_naming_the_field(kwargs, field):
    with pytest.raises(UserError) as e:
        SamplingConfig(**kwargs).validate()
    value = next(iter(kwargs.values()))
    assert e.value.field == field and str(e.value).startswith(f"{field} {value} must")
    assert e.value.render(lambda f: "--" + f.replace("_", "-")).startswith(
        f"--{field.replace('_', '-')} {value} must")


# --------------------------------------------------------------------------------------------
# stop strings

def run_filter(stops, pieces):
    f = StopFilter(stops)
    out = []
    for p in pieces:
        out.append(f.push(p))
        if f.stopped:
            break
    if not f.stopped:
        out.append(f.flush())
    return out, f.stopped


def test_stop_string_spanning_tokens_is_never_partly_output():
    out, stopped = run_filter(["XYZ"], list("abcXYZdef"))
    assert stopped and "".join(out) == "abc"
    assert out == ["a", "b", "c", "", "", ""]        # X and Y held back, then cut


def test_false_start_is_released_when_resolved():
    out, stopped = run_filter(["XYZ"], list("abXYQd"))
    assert not stopped and "".join(out) == "abXYQd"
    assert out[:5] == ["a", "b", "", "", "XYQ"]


def test_held_text_is_flushed_at_the_end():
    out, stopped = run_filter(["\n\n"], ["line", "\n"])
    assert not stopped and out == ["line", "", "\n"]


def test_earliest_of_several_stops_wins_and_multichar_pieces_work():
    out, stopped = run_filter(["END", "cd"], ["ab", "cdE", "ND"])
    assert stopped and "".join(out) == "ab"
    out, stopped = run_filter(["END", "\n"], ["xyEN", "D\nq"])
    assert stopped and "".join(out) == "xy"


def test_no_stops_passes_pieces_through():
    out, stopped = run_filter([], ["a", "b"])
    assert out == ["a", "b", ""] and not stopped


# --------------------------------------------------------------------------------------------
# detokenizing

class ByteTokenizer:
    """A toy byte-level tokenizer: a multi-byte character spans several tokens."""
    kind = "bytes"
    bos_id, eos_id = 256, 257

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_multibyte_character_split_across_tokens_comes_out_whole():
    d = Detokenizer(ByteTokenizer())
    pieces = [d.push(b) for b in "aé€b".encode("utf-8")]
    assert pieces == ["a", "", "é", "", "", "€", "b"]
    assert d.flush() == ""


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    d = Detokenizer(ByteTokenizer())
    pieces = [d.push(b) for b in "x€".encode("utf-8")[:-1]]
    assert "".join(pieces) == "x"
    assert d.flush() == "\ufffd"


def test_char_detokenizer_maps_ids_to_characters_and_specials_to_nothing():
    from randygpt.tokenizer import CharTokenizer
    tok = CharTokenizer("hello world")
    d = Detokenizer(tok)
    ids = list(tok.encode("hold")) + [tok.bos_id, tok.eos_id]
    assert "".join(d.push(i) for i in ids) == "hold"


def test_encode_prompt_can_begin_a_document_at_bos():
    from randygpt.sample import encode_prompt
    from randygpt.tokenizer import CharTokenizer
    tok = CharTokenizer("abk")
    assert encode_prompt(tok, "ka", bos=True) == [tok.bos_id] + tok.encode("ka").tolist()
    assert encode_prompt(tok, "ka") == tok.encode("ka").tolist()
    assert encode_prompt(tok, "", bos=True) == encode_prompt(tok, "") == [tok.bos_id]
