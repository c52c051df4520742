"""The schedule (schedule.py): a time budget fitted from measured steps, plateaus, early stopping,
all recorded in the checkpoint so that a resume continues them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import randygpt.schedule as schedule_module
from randygpt.checkpoint import load_checkpoint
from randygpt.cli import main
from randygpt.config import ModelConfig, TrainConfig, parse_duration
from randygpt.data import builtin_sample_text
from randygpt.errors import UserError
from randygpt.optim import lr_at
from randygpt.runs import plan_run
from randygpt.schedule import Schedule, ScheduleState
from randygpt.train import train

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TEXT = builtin_sample_text()
QUIET = dict(sample_tokens=0, log=lambda *_: None, backend="reference")


class Clock:
    """A fake time.monotonic for the schedule: the test says how long everything takes."""
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(schedule_module.time, "monotonic", c)
    return c


def test_durations_parse_and_bad_ones_are_refused():
    assert parse_duration("180") == parse_duration("180s") == parse_duration("3m") == 180
    assert parse_duration("1h30m") == 5400 and parse_duration("2.5m") == 150
    assert parse_duration(" 1H ") == 3600 and parse_duration("1m30s") == 90
    for bad in ("", "m", "3 minutes", "-5s", "1d", "3m1h"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def test_a_bad_budget_flag_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "randygpt", "train", "--time-budget", "3 min"],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "randygpt train: error: argument --time-budget: '3 min' is not a duration: write e.g. "
        "180s, 3m or 1h30m (see 'randygpt train --help')")


def simulate(clock, sched, step_s, eval_s, interval, slow_from=None, start_s=2.0,
             slow_until=10**9, targets=None, forward_s=None):
    """Run the loop's calls on a fake clock: each step takes step_s (x3 from `slow_from` to
    `slow_until`), each evaluation eval_s. Returns (iterations done, seconds at the end of the
    final work); `targets` collects the target after each step. `forward_s`: the part of an
    evaluation that was its loss estimates (the rest: checkpoint, loss curve)."""
    start = clock.now
    clock.now += start_s                                  # start-up
    it = 0
    while not sched.done(it):
        s = step_s * (3 if slow_from is not None and slow_from <= it < slow_until else 1)
        s = s * 20 if it == 0 else s                      # the first step compiles
        clock.now += s
        it += 1
        sched.stepped(it, s, first_of_session=it == 1)
        if targets is not None:
            targets.append(sched.target)
        if it % interval == 0 or sched.done(it):
            clock.now += eval_s
            sched.evaluated(eval_s, forward_s)
    return it, clock.now - start


@pytest.mark.parametrize("forward_s", [None, 0.2])
def test_the_target_is_fitted_to_the_budget_and_fixed_when_the_decay_starts(clock, forward_s):
    t = TrainConfig(iters=10**9, time_budget=60, warmup=20, decay_frac=0.3, eval_interval=50,
                    eval_iters=10, batch_size=8)
    sched = Schedule(t, 64, started=clock.now, final_tokens=2 * 5000)
    done, seconds = simulate(clock, sched, step_s=0.1, eval_s=0.8, interval=50,
                             forward_s=forward_s)
    # what fits: 60 s less the 1 % margin, start-up, the compiling first step and the final
    # work: an evaluation plus 10,000 forward tokens at the loss estimates' rate per token
    # (where the evaluation's 0.8 s were 0.2 s of forward passes and 0.6 s of checkpoint and
    # loss curve, the tokens are priced at 0.2 s per 20 x 8 x 64)
    final = 0.8 + 10_000 * (forward_s or 0.8) / (20 * 8 * 64)
    per_step = 0.1 + 0.8 / 50
    ideal = (60 * 0.99 - 2.0 - 2.0 - final) / per_step
    assert sched.state.fixed and sched.state.stopped is None
    assert abs(done - ideal) < 0.03 * ideal, (done, ideal)
    assert 0.95 * 60 < seconds <= 60
    # the LR curve ran its whole course: warmup, constant, cosine down to min_lr at the target
    assert sched.lr(done - 1) == pytest.approx(lr_at(done - 1, done, t.lr, t.min_lr, 20, 0.3))
    assert sched.lr(done - 1) < 1.01 * t.min_lr + 1e-6


def test_a_machine_that_slows_down_still_ends_inside_the_budget(clock):
    t = TrainConfig(iters=10**9, time_budget=60, warmup=20, decay_frac=0.3, eval_interval=50,
                    eval_iters=10, batch_size=8)
    sched = Schedule(t, 64, started=clock.now, final_tokens=10_000)
    done, seconds = simulate(clock, sched, step_s=0.1, eval_s=0.8, interval=50, slow_from=380)
    assert seconds <= 60
    # quiet, the target was ~467 and the decay began near 326; at 3x slower from step 380 the
    # steps left did not fit, so the decay was shortened from the same start, not cut off
    quiet = Schedule(t, 64, started=clock.now, final_tokens=10_000)
    simulate(clock, quiet, step_s=0.1, eval_s=0.8, interval=50)
    start = quiet.state.decay_start
    # (the step estimate, a moving average, lags the slow-down: the last step may not fit)
    assert sched.target - 1 <= done <= sched.target < quiet.target
    assert sched.state.decay_start == start and 300 < start < 380 < done
    assert done > 380 + 0.2 * (quiet.target - 380)     # the steps that still fit were used
    # the LR curve: the quiet run's up to the slow-down, then a shorter cosine to min_lr
    assert [sched.lr(i) for i in range(start + 1)] == [quiet.lr(i) for i in range(start + 1)]
    assert sched.lr(done - 1) < 1.05 * t.min_lr
    lrs = [sched.lr(i) for i in range(start, done)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # slow for 20 steps, then quiet again: the target comes back out, and the time is used
    spell, targets = Schedule(t, 64, started=clock.now, final_tokens=10_000), []
    done, seconds = simulate(clock, spell, step_s=0.1, eval_s=0.8, interval=50, slow_from=380,
                             slow_until=400, targets=targets)
    low = min(targets[380:])
    assert 0.95 * 60 < seconds <= 60 and done - low >= 10 and done < quiet.target
    assert spell.lr(done - 1) < 1.05 * t.min_lr and spell.state.decay_start == start
    # slow until the decay has begun (at 111, planned to end at 159), then quiet: the
    # cosine's end moves past where it was planned when it began
    late, targets = Schedule(t, 64, started=clock.now, final_tokens=10_000), []
    done, seconds = simulate(clock, late, step_s=0.1, eval_s=0.8, interval=50, slow_from=0,
                             slow_until=130, targets=targets)
    at_start = targets[late.state.decay_start - 1]
    assert 0.95 * 60 < seconds <= 60 and done > at_start + 20
    assert late.lr(done - 1) < 1.05 * t.min_lr


def test_iters_caps_a_budget_and_no_budget_means_the_iteration_target(clock):
    t = TrainConfig(iters=100, time_budget=3600, warmup=10)
    sched = Schedule(t, 64, started=clock.now)
    assert simulate(clock, sched, 0.1, 0.5, 50)[0] == 100
    plain = Schedule(TrainConfig(iters=70), 64, started=clock.now)
    assert plain.target == 70 and not plain.adaptive
    assert [plain.lr(i) for i in range(70)] == [lr_at(i, 70, 1e-3, 1e-4, 100, 0.3)
                                                for i in range(70)]


def test_plateaus_reduce_the_lr_and_early_stop_ends_the_run():
    t = TrainConfig(iters=1000, lr_on_plateau=2, plateau_factor=0.5, early_stop=5, warmup=0,
                    decay_frac=0.0)
    sched = Schedule(t, 64)
    said = [sched.after_evaluation(v) for v in (3.0, 2.5, 2.6, 2.5)]    # 2 without gain
    assert said[:3] == [None, None, None] and "plateau" in said[3]
    assert sched.state.lr_scale == 0.5 and sched.lr(500) == 0.5e-3
    assert sched.after_evaluation(2.49999) is None      # under 0.01 % better: no improvement
    assert sched.state.stalled == 3 and sched.state.lr_scale == 0.5
    assert sched.after_evaluation(2.4) is None and sched.state.stalled == 0   # improved
    for _ in range(4):
        sched.after_evaluation(2.45)
    assert sched.state.lr_scale == 0.125 and not sched.done(10)   # two more reductions
    assert "early stop" in sched.after_evaluation(2.45)
    assert sched.state.stopped == "early_stop" and sched.done(10)


def test_schedule_state_round_trips_and_forged_states_are_refused():
    s = ScheduleState(target=500, fixed=False, elapsed_s=12.5, lr_scale=0.25, stalled=2,
                      since_reduction=1, best=1.75)
    assert ScheduleState.from_json(json.loads(json.dumps(s.to_json()))) == s
    shortened = ScheduleState(target=412, fixed=True, decay_start=326, elapsed_s=50.0)
    assert ScheduleState.from_json(json.loads(json.dumps(shortened.to_json()))) == shortened
    assert ScheduleState.from_json({"target": 5}).decay_start is None   # older checkpoints
    for bad in ({"target": "500"}, {"target": 5, "lr_scale": -1.0}, {"target": 5, "stalled": True},
                {"target": 5, "decay_start": -3}, {"target": 5, "decay_start": 2.5},
                {"target": 5, "stopped": "because"}, {"target": 5, "elapsed_s": float("nan")},
                [5]):
        with pytest.raises(UserError, match="schedule"):
            ScheduleState.from_json(bad)


# ---------------------------------------------------------------------------------------------
# in real training runs

def tiny(**train):
    m = ModelConfig(block_size=16, n_layer=1, n_embd=16, n_head=2, dropout=0.0)
    t = TrainConfig(**{**dict(iters=60, batch_size=4, lr=3e-2, warmup=2, decay_frac=0.0,
                              eval_interval=4, eval_iters=2, seed=3), **train})
    return m, t


def rows(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def test_plateau_and_early_stop_in_training_and_a_resume_continues_them_exactly(tmp_path):
    # a high LR on a tiny model stalls soon: reductions, then the early stop, before iters
    m, t = tiny(lr_on_plateau=1, plateau_factor=0.5, early_stop=3, iters=400)
    one = train(plan_run(m, t, text=TEXT, out_dir=str(tmp_path / "one")), **QUIET)
    done = one.iters_done
    assert done < 400
    state = load_checkpoint(str(tmp_path / "one" / "checkpoint.safetensors")).meta.schedule
    assert state.stopped == "early_stop" and state.stalled == 3 and state.lr_scale < 1
    lrs = [r["lr"] for r in rows(tmp_path / "one")]
    assert min(lrs) < 3e-2 / 2                         # the logged LR went down
    # the same run stopped halfway (a Ctrl-C) and resumed: the same iterations and weights
    half = (done // 2) // 4 * 4 + 2                    # between two evaluations
    two = str(tmp_path / "two")
    train(plan_run(m, t, text=TEXT, out_dir=two), stop_after=half, **QUIET)
    mid = load_checkpoint(os.path.join(two, "checkpoint.safetensors")).meta.schedule
    assert mid.stalled >= 0 and mid.stopped is None
    again = train(plan_run(resume="", out_dir=two, text=TEXT), **QUIET)
    assert again.iters_done == done
    assert [(r["iter"], r["val_loss"], r["lr"]) for r in rows(two)] == \
        [(r["iter"], r["val_loss"], r["lr"]) for r in rows(tmp_path / "one")]
    np.testing.assert_array_equal(again.model.params.flat, one.model.params.flat)


def test_a_budgeted_run_stops_in_time_and_a_resume_gets_only_what_is_left(tmp_path, capsys):
    m, t = tiny(time_budget=6.0, warmup=5, decay_frac=0.5, eval_interval=20)
    out = str(tmp_path / "run")
    plan = plan_run(m, {"time_budget": 6.0, **{k: v for k, v in t.to_dict().items()
                                               if k != "iters"}}, text=TEXT, out_dir=out)
    assert plan.train.iters == 10**9                   # the budget alone sets the target
    first = train(plan, **QUIET, stop_after=30)        # interrupted early
    state = load_checkpoint(os.path.join(out, "checkpoint.safetensors")).meta.schedule
    assert first.iters_done == 30 and 0 < state.elapsed_s < 6.0
    rest = train(plan_run(resume="", out_dir=out, text=TEXT), **QUIET)
    final = load_checkpoint(os.path.join(out, "checkpoint.safetensors")).meta.schedule
    assert rest.iters_done > 30 and final.fixed
    assert final.elapsed_s <= 6.0                      # both sessions together, in budget
    assert rest.iters_done == final.target or final.stopped == "time"
    last = rows(out)[-1]
    assert "val_loss_exact" in last                    # the final evaluation was done
    capsys.readouterr()
    assert main(["info", out]) == 0
    shown = capsys.readouterr().out
    assert f"iteration: {rest.iters_done} of {final.target};" in shown
    assert f"time budget: {final.elapsed_s:.0f} s of 6 s used" in shown
    # a budget used up: resuming needs a larger one
    with pytest.raises(UserError, match="time budget"):
        plan_run({"time_budget": 1.0}, resume="", out_dir=out, text=TEXT)
