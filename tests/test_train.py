"""The training loop as a library: it learns, it is deterministic, it writes metrics."""
import time
import json
import math

import numpy as np

from randygpt.config import ModelConfig, TrainConfig
from randygpt.data import get_batch
from randygpt.runs import plan_run
from randygpt.train import train

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def tiny(**kw):
    m = ModelConfig(block_size=16, n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    t = TrainConfig(iters=60, batch_size=8, lr=3e-3, warmup=5, eval_interval=30, eval_iters=4,
                    seed=3)
    for k, v in kw.items():
        setattr(m if hasattr(m, k) else t, k, v)
    return m, t


def test_training_learns_a_repetitive_text(tmp_path):
    m, t = tiny(iters=150)
    r = train(plan_run(m, t, text=TEXT, out_dir=str(tmp_path)), sample_tokens=60,
              log=lambda *_: None)
    first, last = r.history[0], r.history[-1]
    assert m.vocab_size == 0                            # the caller's config is not changed
    assert math.log(r.model.cfg.vocab_size) > 2.5 and last["val_loss"] < 1.0   # from ~3.0 at init
    assert last["train_loss"] < first["train_loss"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [30, 60, 90, 120, 150]
    for key in ("iter", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_sec", "elapsed_s"):
        assert key in rows[-1]
    assert rows[-1]["val_ppl"] == round(math.exp(rows[-1]["val_loss"]), 4)
    assert len(r.sample) > 0 and set(r.sample) <= set(TEXT)


def test_same_seed_same_losses_different_seed_different():
    quiet = dict(sample_tokens=0, log=lambda *_: None)
    a = train(plan_run(*tiny(dropout=0.1), text=TEXT), **quiet)
    b = train(plan_run(*tiny(dropout=0.1), text=TEXT), **quiet)
    c = train(plan_run(*tiny(dropout=0.1, seed=4), text=TEXT), **quiet)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    np.testing.assert_array_equal(a.model.params.flat, b.model.params.flat)
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]


def test_batches_are_shifted_windows():
    tokens = np.arange(900, dtype=np.int32)
    x, y = get_batch(tokens, 16, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 8)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(x[:, 1:] - x[:, :-1], 1)       # contiguous windows
    assert x.max() < 900 and y.max() < 900


def test_train_step_is_forward_backward_hook_clip_update():
    from randygpt.model import GPT
    from randygpt.optim import clip_grad_norm
    from randygpt.step import make_optimizer, train_step
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_embd=16, n_head=2, dropout=0.1)
    x, y = get_batch(np.arange(200, dtype=np.int32) % 11, 4, 8, np.random.default_rng(0))
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=1)
    opt_a, opt_b = (make_optimizer(m, TrainConfig(), m.backend) for m in (a, b))
    seen = []
    r = train_step(a, opt_a, x, y, 1e-2, grad_clip=0.5, dropout_rng=np.random.default_rng(2),
                   grad_hook=lambda g: seen.append(g.copy()))
    _, loss = b.forward(x, y, rng=np.random.default_rng(2))           # the same, by hand
    b.backward()
    np.testing.assert_array_equal(seen[0], b.grads.flat)              # the hook: before clip
    norm = clip_grad_norm(b.grads.flat, 0.5)
    opt_b.step(b.grads.flat, 1e-2)
    assert (r.loss, r.grad_norm) == (loss, norm) and norm > 0.5
    np.testing.assert_array_equal(a.params.flat, b.params.flat)

    def refuse(loss):                        # a rejected loss never reaches the weights
        raise ValueError(loss)
    before = a.params.flat.copy()
    with np.testing.assert_raises(ValueError):
        train_step(a, opt_a, x, y, 1e-2, grad_clip=0.5, dropout_rng=np.random.default_rng(3),
                   check_loss=refuse)
    np.testing.assert_array_equal(a.params.flat, before)
    assert opt_a.step_count == 1


def test_plan_run_layers_preset_then_explicit_settings_and_copies_nothing_back():
    m, t = tiny()
    plan = plan_run({"n_layer": 3, "lr": 0.5}, preset="tiny", text=TEXT)
    assert (plan.model.n_layer, plan.model.n_embd, plan.train.lr) == (3, 64, 0.5)
    plan = plan_run(m, t, {"seed": 8}, text=TEXT)
    assert plan.model == m and plan.train.seed == 8 and t.seed == 3
    assert plan.out_dir is None and plan.cache_dir is None and plan.notices == ()


def test_the_last_evaluation_is_exact_and_exact_eval_makes_every_one_exact(tmp_path):
    from randygpt.evaluate import evaluate_documents
    text = "".join(f"{w}\n" for w in TEXT.split())
    m, t = tiny(iters=40, eval_interval=20)
    quiet = dict(sample_tokens=0, log=lambda *_: None)
    plain = train(plan_run(m, t, text=text, doc_separator="\n"), **quiet)
    assert ["val_loss_exact" in r for r in plain.history] == [False, True]
    exact = train(plan_run(m, t, text=text, doc_separator="\n",
                           out_dir=str(tmp_path / "run")), exact_eval=True, **quiet)
    assert all("val_loss_exact" in r for r in exact.history)
    # the exact number is the loss over every validation target of the run's own split
    from randygpt.data import load_documents, split_documents
    docs = load_documents(text, exact.tokenizer, "\n", log=lambda *_: None)
    split = split_documents(docs, 16, exact.tokenizer.decode, shuffle=True, seed=t.seed)
    want = evaluate_documents(exact.model, split.val).loss
    assert abs(exact.history[-1]["val_loss_exact"] - want) < 1e-5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == exact.history


def test_first_run_notice_and_tok_s_of_real_tokens_without_the_first_step(monkeypatch,
                                                                           tmp_path):
    # a fake clock: every perf_counter() call is one second later, so each step takes 1 s;
    # documents shorter than the block leave padded (ignored) targets, which must not count
    from types import SimpleNamespace

    import randygpt.train as tr
    from randygpt.ops.contract import get_backend
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(tr, "time", SimpleNamespace(perf_counter=lambda: float(next(clock)),
                                                    monotonic=time.monotonic))
    real, step = [], tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda model, opt, x, y, *a, **k:
                        real.append(int((y >= 0).sum())) or step(model, opt, x, y, *a, **k))
    backend = get_backend("fused")
    backend.options = dict(backend.options, compile_seconds=lambda: 7.2)
    lines = []
    m, t = tiny(iters=4, eval_interval=4)
    text = "\n".join(["short one", "a little longer line", "tiny"] * 40)
    train(plan_run(m, t, text=text, out_dir=str(tmp_path), doc_separator="\n"),
          backend=backend, sample_tokens=0, log=lines.append)
    assert "compiling fast kernels once, ~7 s (later runs load them from disk)" in lines
    assert len(real) == 4 and sum(real) < 4 * t.batch_size * m.block_size     # padding
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["tokens_per_sec"] == round(sum(real[1:]) / 3, 1)


def test_a_small_split_is_estimated_on_about_one_batch_position_per_target():
    from randygpt.train import estimate_batches, estimate_loss, prepare
    m, t = tiny(eval_iters=20)                  # a batch holds 8 x 16 = 128 targets
    run = prepare(plan_run(m, t, text=TEXT), backend="reference", log=lambda *_: None)
    train_n, val_n = run.split.train.n_targets, run.split.val.n_targets
    assert (train_n, val_n) == (2431, 269)
    assert estimate_batches(run.split.train, t, 16) == 19           # ceil(2431 / 128)
    assert estimate_batches(run.split.val, t, 16) == 3              # ceil(269 / 128)
    assert estimate_batches(np.zeros(100_000, np.int32), t, 16) == 20   # a big one: eval_iters
    calls = []
    loss = run.model.loss
    run.model.loss = lambda x, y: calls.append(x.shape) or loss(x, y)
    value = estimate_loss(run.model, run.split.val, t, seed=3)
    assert calls == [(8, 16)] * 3                                   # at init: about ln V
    assert abs(value - math.log(run.model.cfg.vocab_size)) < 0.2
    # the same batches every evaluation
    assert value == estimate_loss(run.model, run.split.val, t, seed=3)


def test_the_built_in_sample_is_a_quick_demo_unless_settings_are_chosen(tmp_path, monkeypatch):
    from randygpt.runs import SAMPLE_ITERS
    monkeypatch.chdir(tmp_path)                 # no train.txt here
    demo = plan_run({})
    assert (demo.model.n_layer, demo.model.n_embd, demo.train.batch_size, demo.train.lr,
            demo.train.iters, demo.backend) == (2, 64, 16, 3e-3, SAMPLE_ITERS, "reference")
    assert any("200-iteration demo of the tiny preset" in line for line in demo.notices)
    mine = plan_run({"lr": 1e-3}, preset="small")       # a preset or a setting chosen wins
    assert (mine.model.n_layer, mine.model.n_embd, mine.train.batch_size, mine.train.lr,
            mine.train.iters, mine.backend) == (6, 128, 32, 1e-3, SAMPLE_ITERS, None)
    real = plan_run({"iters": 50})                        # iterations chosen: not a demo
    assert (real.model.n_layer, real.train.iters, real.backend) == (6, 50, None)
    (tmp_path / "train.txt").write_text(TEXT)           # a text of one's own: not a demo
    assert plan_run({}).backend is None and plan_run({}).train.iters == TrainConfig().iters
