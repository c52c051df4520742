"""When to stop and at what learning rate: the iteration target, a time budget, plateaus.

The LR curve is optim.lr_at's (warmup -> constant -> cosine over the final decay_frac of the
run), drawn towards a *target* iteration. Without a time budget the target is --iters. With
one (--time-budget 3m) the target is fitted to the wall time left: after each step

    target = done + (budget - elapsed - final work) / (seconds a step + an evaluation's share)

with seconds measured in this run (the first step of a process, which compiles, left out)
and "final work" the last evaluation, the exact validation pass and the sample. During warmup
and the constant phase the LR does not depend on the target, so refitting it changes nothing
already done. Once `done` reaches the decay's start, that start is fixed; the cosine's end
is still fitted to the time left after every step, so the LR still reaches min_lr: sooner
if the machine slows down, later if it speeds up (on a virtual machine whose hypervisor gave
its cores away for part of the time, one run measured 7.9k and 17.2k tokens/s an hour
apart). Where not one more step fits, the run stops at once. So a budgeted run's losses
repeat a same-seed run's up to where the decay starts; where it starts, and everything
after, depends on the measured speed.

Plateaus (--lr-on-plateau N): when the val loss has not improved (by 0.01 %) for N
evaluations, every later LR is multiplied by --plateau-factor. Early stopping (--early-stop N):
the run ends after N evaluations without improvement. The state (target, whether fixed, time
used, LR scale, evaluations without improvement) is a ScheduleState in each checkpoint, so a
resume continues all of it; a budget is the total over every session of the run, like --iters.

Under mpiexec rank 0 alone evaluates and its clock decides: its schedule state is shared with
every rank after each step (World.share), so all ranks use the same LR and stop together.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from .errors import UserError
from .optim import decay_start_of, lr_at

IMPROVEMENT = 1e-4            # a val loss lower by this fraction of the best is an improvement
MARGIN = 0.01                 # of the budget, kept free for what estimates miss
MIN_STEPS_TO_FIT = 3          # measured steps before the target is fitted to the budget


def format_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


@dataclass
class ScheduleState:
    """What a resume needs to continue the schedule (stored in the checkpoint's metadata)."""
    target: int                  # the iteration the LR schedule ends at
    fixed: bool = True           # False while a budget may still move the decay's start
    decay_start: int | None = None   # where a budgeted run's cosine began (it stays there)
    elapsed_s: float = 0.0       # budgeted wall time used by the run's sessions so far
    lr_scale: float = 1.0        # the product of the plateau reductions so far
    stalled: int = 0             # evaluations since the val loss last improved
    since_reduction: int = 0     # of those, evaluations since the last LR reduction
    best: float | None = None    # the best val loss the counters compare against
    stopped: str | None = None   # why the run ended before its target ("early_stop", "time")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d) -> "ScheduleState":
        """Checked field by field: a forged file is a UserError, never a crash later."""
        if not isinstance(d, dict) or not isinstance(d.get("target"), int):
            raise UserError("metadata field schedule is malformed (it needs an integer target)")
        names = set(cls.__dataclass_fields__)
        state = cls(**{k: v for k, v in d.items() if k in names})
        for k in ("target", "stalled", "since_reduction") + (
                ("decay_start",) if state.decay_start is not None else ()):
            v = getattr(state, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"metadata field schedule.{k} is {v!r}, not a count")
        for k in ("elapsed_s", "lr_scale") + (("best",) if state.best is not None else ()):
            v = getattr(state, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v >= 0):
                raise UserError(f"metadata field schedule.{k} is {v!r}, not a number >= 0")
        if not isinstance(state.fixed, bool) or state.stopped not in (None, "early_stop",
                                                                      "time"):
            raise UserError("metadata field schedule is malformed (fixed / stopped)")
        return state


class Schedule:
    """The LR of each iteration and whether to go on. `started`: time.monotonic() when this
    session began (the CLI's start: start-up counts against a budget)."""

    def __init__(self, tcfg, block: int, state: ScheduleState | None = None,
                 started: float | None = None, final_tokens: int = 0,
                 eval_batches: int | None = None):
        self.tcfg = tcfg
        # forward batches of one evaluation's loss estimates (train + val)
        self.eval_batches = 2 * tcfg.eval_iters if eval_batches is None else eval_batches
        budget = tcfg.time_budget
        self.state = state or ScheduleState(target=tcfg.iters, fixed=not budget)
        if not budget:                          # the target is the (maybe new) --iters
            self.state.target, self.state.fixed = tcfg.iters, True
            self.state.decay_start = None
        self.state.stopped = None
        self.started = time.monotonic() if started is None else started
        self.used_before = self.state.elapsed_s
        # measured costs: a training step, an evaluation, and the final work's tokens
        # (an exact pass over the validation split, the sample), priced per forward token
        self.step_s, self.steps_timed, self.eval_s, self.forward_s = 0.0, 0, None, None
        self.final_tokens, self.block = final_tokens, block

    @property
    def adaptive(self) -> bool:
        """Does anything but the iteration count decide (so ranks must share the state)?"""
        t = self.tcfg
        return bool(t.time_budget or t.lr_on_plateau or t.early_stop)

    @property
    def target(self) -> int:
        return self.state.target

    def elapsed(self) -> float:
        return self.used_before + time.monotonic() - self.started

    def lr(self, it: int) -> float:
        t = self.tcfg
        return lr_at(it, self.state.target, t.lr, t.min_lr, t.warmup, t.decay_frac,
                     self.state.decay_start) * self.state.lr_scale

    def done(self, it: int) -> bool:
        return it >= self.state.target or self.state.stopped is not None

    # ---- measurements ---------------------------------------------------------------------
    def stepped(self, done: int, seconds: float, first_of_session: bool) -> None:
        """A training step took `seconds`; refit the target to the budget."""
        if not first_of_session:                # the first step compiles: not a step's cost
            self.steps_timed += 1
            w = max(0.05, 1 / self.steps_timed)     # the mean, then a moving average
            self.step_s += w * (seconds - self.step_s)
        if self.tcfg.time_budget:
            self._fit(done)

    def evaluated(self, seconds: float, forward_seconds: float | None = None) -> None:
        """An evaluation took `seconds` in all (loss estimates, checkpoint, loss curve), of
        which `forward_seconds` were the loss estimates' forward passes."""
        self.eval_s = seconds if self.eval_s is None else 0.5 * (self.eval_s + seconds)
        if forward_seconds is not None:
            self.forward_s = forward_seconds if self.forward_s is None else 0.5 * (
                self.forward_s + forward_seconds)

    def _eval_seconds(self) -> float:
        """An evaluation: measured, or before the first one its forward batches at a third of
        a training step each (a step is forward + backward + update)."""
        if self.eval_s is not None:
            return self.eval_s
        return self.eval_batches * self.step_s / 3

    def _final_seconds(self, eval_s: float) -> float:
        """The last evaluation, then the final work's tokens (the exact validation pass and
        the sample) at the loss estimates' cost per forward token. Not the whole evaluation's:
        that includes writing the checkpoint and the loss curve (the first one imports
        matplotlib), which priced 111k validation tokens at 25 s where they took 3."""
        t = self.tcfg
        forward_s = self.forward_s if self.forward_s is not None else eval_s
        per_forward_token = forward_s / (self.eval_batches * t.batch_size * self.block)
        return eval_s + self.final_tokens * per_forward_token

    def _fit(self, done: int) -> None:
        t, s = self.tcfg, self.state
        eval_s = self._eval_seconds()
        # the evaluation about to run (this step ends an interval) is not in `elapsed` yet
        due = eval_s if done % t.eval_interval == 0 and done < s.target else 0.0
        left = (t.time_budget * (1 - MARGIN) - self.elapsed() - self._final_seconds(eval_s)
                - due)
        if self.steps_timed < MIN_STEPS_TO_FIT:
            if left <= 0:                       # not even the start fits
                s.stopped = "time"
            return
        if not s.fixed:
            s.target = min(t.iters, done + self._steps_that_fit(done, left, eval_s))
            start = decay_start_of(s.target, t.warmup, t.decay_frac)
            if done >= start:                   # the decay begins: its start stays put
                s.fixed, s.decay_start = True, start
            return
        if done >= s.target:
            return
        if s.decay_start is None:               # a checkpoint from before this field
            s.decay_start = decay_start_of(s.target, t.warmup, t.decay_frac)
        # the decay ends at the last step that fits, from the same start, so the LR still
        # reaches min_lr: sooner if the machine slows down, later if it speeds up
        fits = self._steps_that_fit(done, left, eval_s)
        if fits == 0:
            s.stopped = "time"                  # not one more step fits: stop now
        else:
            s.target = min(t.iters, done + fits)

    def _cost(self, done: int, n: int, eval_s: float) -> float:
        """Seconds for n more steps and the evaluations among them (the one at the last step
        is the final evaluation, priced in the final work)."""
        every = self.tcfg.eval_interval
        return n * self.step_s + ((done + n - 1) // every - done // every) * eval_s

    def _steps_that_fit(self, done: int, left: float, eval_s: float) -> int:
        n = max(0, int(left / (self.step_s + eval_s / self.tcfg.eval_interval)))
        while n > 0 and self._cost(done, n, eval_s) > left:
            n -= 1
        while self._cost(done, n + 1, eval_s) <= left:
            n += 1
        return n

    def after_evaluation(self, score: float) -> str | None:
        """The val loss of an evaluation: plateau and early-stop counters. Returns a line to
        tell the user, or None."""
        t, s = self.tcfg, self.state
        if s.best is None or score < s.best * (1 - IMPROVEMENT):
            s.best, s.stalled, s.since_reduction = score, 0, 0
            return None
        s.stalled += 1
        s.since_reduction += 1
        if t.early_stop and s.stalled >= t.early_stop:
            s.stopped = "early_stop"
            return (f"early stop: the val loss has not improved for {s.stalled} evaluations "
                    f"(best {s.best:.4f})")
        if t.lr_on_plateau and s.since_reduction >= t.lr_on_plateau:
            s.lr_scale *= t.plateau_factor
            s.since_reduction = 0
            return (f"val loss plateau ({t.lr_on_plateau} evaluations without improvement): "
                    f"the LR is now {s.lr_scale:g} x the schedule's")
        return None

    # ---- checkpoints and ranks ------------------------------------------------------------
    def snapshot(self) -> ScheduleState:
        """The state to store now (time used includes this session so far)."""
        return ScheduleState(**{**asdict(self.state), "elapsed_s": round(self.elapsed(), 3)})

    def share(self, world) -> None:
        """Every rank takes rank 0's decisions (its clock and its evaluations)."""
        s = self.state
        code = {None: 0, "early_stop": 1, "time": 2}[s.stopped]
        start = -1 if s.decay_start is None else s.decay_start
        target, fixed, scale, code, start = world.share(
            [s.target, float(s.fixed), s.lr_scale, code, start])
        s.target, s.fixed, s.lr_scale = int(target), bool(fixed), float(scale)
        s.decay_start = None if start < 0 else int(start)
        s.stopped = (None, "early_stop", "time")[int(code)]

    def stop_line(self) -> str:
        if self.state.stopped == "time":
            return (f"time budget: stopped at {format_duration(self.elapsed())} of "
                    f"{format_duration(self.tcfg.time_budget)}")
        return ""
