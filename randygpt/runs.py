"""Resolving a run before anything trains: fresh, resume or fine-tune. Every rule is here, once.

    fresh      preset < explicit settings. The text is data_path's, else ./train.txt, else the
               built-in sample, which is a short demo unless the iterations are chosen.
    resume     the checkpoint's configuration; a setting that contradicts it is refused (only
               the iteration target may change, and it must lie ahead); the same text and
               documents (the checkpoint remembers where its text was).
    fine-tune  the checkpoint's weights, tokenizer and model shape (dropout may change, the
               block may shorten: wpe's first rows), with a fresh optimizer and counter and
               the training settings chosen now.

A run directory holding a checkpoint is only written by a resume of that checkpoint; the
default one is runs_dir/<data>-<preset>-<time>, and the token cache sits next to it. The result
is a RunPlan; train() runs it without checking it again.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from .checkpoint import (BEST, LATEST, Checkpoint, DataInfo, load_checkpoint,
                         remove_stale_temp_files)
from .config import DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig
from .data import builtin_sample_text, read_text
from .errors import UserError
from .memory import fitting_batch

SHAPE = ("n_layer", "n_embd", "n_head", "block_size")
# A resume may change the iteration target and the micro-batches per rank (with a different
# number of MPI ranks, --grad-accum can keep the step's batch: batch x grad_accum x ranks).
# A resume may also change the time budget (a total, like iters) and the stopping rules.
RESUME_MAY_SET = ("iters", "grad_accum", "time_budget", "lr_on_plateau", "plateau_factor",
                  "early_stop")
# With a time budget and no --iters, the budget alone sets the target: iters is only a cap.
BUDGET_ITERS_CAP = 10**9
# On the ~5 KB built-in sample the small preset's val loss is lowest after ~150 iterations and
# then climbs as it memorises the text (measured: 2.25 at 150, 2.65 at 300, 3.54 at 500 of a
# 2000-iteration run): a demo run stops near the minimum.
SAMPLE_ITERS = 200
# The demo's model, unless a preset or the setting is chosen: the README's Quickstart must
# fit in a minute with the install (~33 s). The text, not the model, limits it. Measured
# after 200 iterations, mean exact val loss of seeds 1337-1339 (Xeon 6/167, 2026-12-03):
#   small preset, defaults (batch 32, LR 1e-3), fused kernels     2.281   58 s (80 s cold)
#   tiny preset, batch 32, LR 1e-3 / 3e-3, readable NumPy ops     2.377 / 2.281   22-26 s
#   tiny preset, batch 16, LR 3e-3, readable NumPy ops            2.353   13-16 s
# and the fused kernels would first compile for ~20 s, longer than the demo runs.
SAMPLE_PRESET, SAMPLE_SETTINGS = "tiny", dict(batch_size=16, lr=3e-3)
SAMPLE_BACKEND = "reference"


@dataclass(frozen=True)
class RunPlan:
    model: ModelConfig            # vocab_size 0: the tokenizer sets it
    train: TrainConfig
    text: str = field(repr=False)
    text_sha256: str
    data_path: str | None         # the text's file (None: given as text, train.txt, built-in)
    out_dir: str | None           # None: nothing is written
    resume: Checkpoint | None = None
    fine_tune: Checkpoint | None = None
    bpe_vocab_size: int | None = None   # train a byte-level BPE tokenizer (fresh runs only)
    doc_separator: str | None = None
    val_split: str = "tail"       # "random": a seeded random 10 % of the documents (data.py)
    cache_dir: str | None = None
    notices: tuple = ()           # what the user should be told (the demo, the built-in text)
    backend: str | None = None    # the backend when none is chosen (None: fused)


class Contradiction(UserError):
    """Settings that contradict a checkpoint: several fields, each rendered by the front end."""

    def __init__(self, conflicts, path, rule):
        self.conflicts, self.path, self.rule = conflicts, path, rule
        super().__init__(self.render(), conflicts[0][0])

    def render(self, name_of=lambda field: field) -> str:
        bad = [f"{name_of(field)} {value} (the checkpoint has {', '.join(theirs)})"
               for field, value, theirs in self.conflicts]
        return f"{', '.join(bad)}: contradicts the checkpoint {self.path}; {self.rule}"


def plan_run(*configs, preset: str | None = None, resume=None, fine_tune=None,
             data_path: str | None = None, text: str | None = None, out_dir: str | None = None,
             runs_dir: str | None = None, bpe_vocab_size: int | None = None,
             doc_separator: str | None = None, cache_dir: str | None = None,
             val_split: str | None = None) -> RunPlan:
    """The plan of a run. `configs`: ModelConfig / TrainConfig objects or dicts of config field
    -> value, the settings chosen explicitly (later ones win); `preset`: a PRESETS name chosen
    explicitly (fresh runs default to DEFAULT_PRESET). `resume` / `fine_tune`: a Checkpoint or
    a path; resume "" is out_dir's latest checkpoint. `runs_dir`: where the default run
    directory goes when out_dir is None (neither: nothing is written). `cache_dir`: default,
    token-cache next to the run directory. `val_split`: "random" (default with a
    doc_separator) or "tail" (default without; a resume keeps its checkpoint's)."""
    if val_split not in (None, "random", "tail"):
        raise UserError(f"{{field}} {val_split!r} must be 'random' or 'tail'", "val_split")
    chosen = {}
    for c in configs:
        chosen.update(c if isinstance(c, dict) else c.to_dict())
    chosen.pop("vocab_size", None)                  # always the tokenizer's
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}",
                        "preset")
    if resume is not None and fine_tune is not None:
        raise UserError("{field} and fine-tuning exclude each other: resume continues a run, "
                        "fine-tuning starts a new one from a checkpoint's weights", "resume")
    if bpe_vocab_size is not None and (resume is not None or fine_tune is not None):
        raise UserError("{field} trains a new tokenizer, but "
                        f"{'resume' if resume is not None else 'fine-tuning'} keeps the "
                        "checkpoint's: drop {field}", "bpe")
    if resume is not None:
        plan = _resume(chosen, preset, _checkpoint_to_resume(resume, out_dir), text, data_path,
                       out_dir, doc_separator)
        kept = plan.resume.meta.data.val_split if plan.resume.meta.data else None
        if val_split is not None and val_split != (kept or "tail"):
            raise UserError(f"{{field}} {val_split} differs from {plan.resume.path}'s "
                            f"({kept or 'tail'}); resume with the same split", "val_split")
        plan = replace(plan, val_split=kept or "tail")
    else:
        if fine_tune is not None and not isinstance(fine_tune, Checkpoint):
            fine_tune = load_checkpoint(fine_tune)
        plan = _fresh(chosen, preset, fine_tune, text, data_path, out_dir, runs_dir)
        plan = replace(plan, bpe_vocab_size=bpe_vocab_size, doc_separator=doc_separator,
                       val_split=val_split or ("random" if doc_separator else "tail"))
    plan.train.validate()
    if plan.out_dir is not None:
        _check_run_dir(plan.out_dir, plan.resume)
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(os.path.normpath(plan.out_dir)),
                                     "token-cache")
    return replace(plan, cache_dir=cache_dir)


def _fresh(chosen, preset, fine_tune, text, data_path, out_dir, runs_dir) -> RunPlan:
    builtin = text is None and data_path is None and not os.path.exists("train.txt")
    demo = (builtin and fine_tune is None and "iters" not in chosen
            and not chosen.get("time_budget"))
    values = dict(PRESETS[preset or DEFAULT_PRESET])
    if demo and preset is None:
        values.update(PRESETS[SAMPLE_PRESET], **SAMPLE_SETTINGS)
    values.update(chosen)
    mcfg, tcfg = ModelConfig.from_dict(values), TrainConfig.from_dict(values)
    notices = []
    if fine_tune is not None:               # the checkpoint's shape; dropout may change
        theirs = fine_tune.model_config
        _refuse_contradictions(preset, chosen, theirs.to_dict(), SHAPE[:3], fine_tune.path,
                               "fine-tuning keeps the checkpoint's model shape: drop the flag")
        block = chosen.get("block_size", theirs.block_size)   # shorter: wpe's first rows
        if block > theirs.block_size:
            raise UserError(f"{{field}} {block} is longer than the checkpoint's "
                            f"{theirs.block_size} positions; fine-tuning can shorten the "
                            "context, not lengthen it", "block_size")
        mcfg = replace(theirs, dropout=chosen.get("dropout", theirs.dropout), block_size=block)
        if "batch_size" not in chosen:      # a big model (GPT-2): a default batch that fits
            batch = fitting_batch(mcfg, tcfg.batch_size)
            if batch < tcfg.batch_size:
                tcfg = replace(tcfg, batch_size=batch)
                notices.append(f"fine-tuning at batch {batch}: the largest default whose memory "
                               "estimate fits (the available memory, at most 24 GiB); a batch "
                               "given explicitly is used as given")
    mcfg = replace(mcfg, vocab_size=0)
    mcfg.validate(need_vocab=False)
    if builtin:
        notices.append("no training text given and no train.txt here: training on the built-in "
                       "sample text (a few KB)")
    if tcfg.time_budget and "iters" not in chosen:
        tcfg = replace(tcfg, iters=BUDGET_ITERS_CAP)
    elif demo:
        tcfg = replace(tcfg, iters=SAMPLE_ITERS,
                       eval_interval=chosen.get("eval_interval", SAMPLE_ITERS // 8))
        model = (f"the {preset} preset" if preset is not None else
                 f"the {SAMPLE_PRESET} preset at batch {tcfg.batch_size}, LR {tcfg.lr:g}, on "
                 "the readable NumPy ops unless --backend is given")
        notices.append(f"the built-in sample is only a few KB: a {SAMPLE_ITERS}-iteration demo "
                       f"of {model} (a bigger model or a longer run only memorises it; put a "
                       "text in train.txt or give --data to train for real)")
    if out_dir is None and runs_dir is not None:
        stem = "sample" if builtin else os.path.splitext(
            os.path.basename(data_path or "train.txt"))[0]
        tag = "finetune" if fine_tune is not None else preset or (
            SAMPLE_PRESET if demo else DEFAULT_PRESET)
        out_dir = os.path.join(runs_dir, f"{stem}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    text = _read(text, data_path)
    return RunPlan(mcfg, tcfg, text, _sha256(text), data_path, out_dir, fine_tune=fine_tune,
                   notices=tuple(notices),
                   backend=SAMPLE_BACKEND if demo and preset is None else None)


def _resume(chosen, preset, ckpt, text, data_path, out_dir, doc_separator) -> RunPlan:
    if not ckpt.resumable:
        raise UserError(f"{ckpt.path} holds weights only (no optimizer or training state), so "
                        "it cannot be resumed; use {field} PATH to start from it", "fine_tune")
    theirs = {**ckpt.model_config.to_dict(), **ckpt.train_config.to_dict()}
    _refuse_contradictions(preset, chosen, theirs,
                           [k for k in theirs if k not in RESUME_MAY_SET], ckpt.path,
                           "on resume the checkpoint's configuration is used: drop the flag, "
                           "or start a new run (or fine-tune) to change it")
    tcfg = replace(ckpt.train_config, **{k: chosen[k] for k in RESUME_MAY_SET if k in chosen})
    if "time_budget" in chosen and chosen["time_budget"] and "iters" not in chosen:
        tcfg = replace(tcfg, iters=max(tcfg.iters, BUDGET_ITERS_CAP))
    schedule = ckpt.meta.schedule
    used = schedule.elapsed_s if schedule is not None else 0.0
    # under 5 % of the budget left cannot hold a session's start-up and final evaluation
    if tcfg.time_budget and used >= tcfg.time_budget * 0.95:
        raise UserError(f"{ckpt.path} has used {used:.0f} s of its {tcfg.time_budget:.0f} s "
                        "time budget; {field} is the total over every session of the run, so "
                        "pass a larger one to train more", "time_budget")
    if ckpt.iter >= tcfg.iters:
        raise UserError(f"{ckpt.path} is already at iteration {ckpt.iter}; {{field}} is the "
                        f"total target, so pass {{field}} larger than {ckpt.iter} to train more",
                        "iters")
    data = ckpt.meta.data or DataInfo()
    if doc_separator is None:               # resume keeps the run's documents
        doc_separator = data.doc_separator
    elif doc_separator != data.doc_separator:
        raise UserError(f"{{field}} differs from {ckpt.path}'s ({data.doc_separator!r}); "
                        "resume with the same documents", "doc_separator")
    if text is None and data_path is None:
        data_path = data.path
    text = _read(text, data_path)
    sha = _sha256(text)
    if sha != data.sha256:
        raise UserError(f"the training text is not the one {ckpt.path} was trained on; resume "
                        "with the same {field}, or fine-tune to go on with new text", "data")
    out_dir = out_dir or os.path.dirname(os.path.abspath(ckpt.path))
    return RunPlan(ckpt.model_config, tcfg, text, sha, data_path, out_dir, resume=ckpt,
                   doc_separator=doc_separator)


def _checkpoint_to_resume(resume, out_dir) -> Checkpoint:
    if isinstance(resume, Checkpoint):
        return resume
    if resume == "":
        if out_dir is None:
            raise UserError("{field} without a PATH continues the run in the run directory: "
                            "give the run directory, or {field} PATH", "resume")
        resume = os.path.join(out_dir, LATEST)
        if not os.path.exists(resume):
            raise UserError(f"{out_dir} holds no {LATEST} to resume; train without {{field}} "
                            "to start a new run there", "resume")
    return load_checkpoint(resume)


def _refuse_contradictions(preset, chosen: dict, theirs: dict, fields, path, rule) -> None:
    """Refuse explicit settings (and a preset's) that differ from the checkpoint's `fields`."""
    typed = [("preset", preset, {k: v for k, v in PRESETS[preset].items() if k in fields})
             ] if preset is not None else []
    typed += [(k, v, {k: v}) for k, v in chosen.items() if k in fields]
    conflicts = []
    for field, value, settings in typed:
        differ = [f"{k} {theirs[k]}" for k, v in settings.items() if v != theirs[k]]
        if differ:
            conflicts.append((field, value, differ))
    if conflicts:
        raise Contradiction(conflicts, path, rule)


def _check_run_dir(out_dir: str, resume: Checkpoint | None) -> None:
    """Never overwrite another run: a run directory with a checkpoint is only written to by a
    resume of a checkpoint that lives in it. Leftover temp files of killed writers go."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{{field}} {out_dir} is a file, not a directory; choose another run "
                        "directory", "out")
    existing = [n for n in (LATEST, BEST) if os.path.exists(os.path.join(out_dir, n))]
    if existing:
        same = resume is not None and os.path.samefile(
            os.path.dirname(os.path.abspath(resume.path)), out_dir)
        if not same:
            raise UserError(f"{out_dir} already holds a checkpoint ({existing[0]}); continue "
                            "that run with {field}, or choose another run directory", "resume")
    if os.path.isdir(out_dir):
        remove_stale_temp_files(out_dir)


LOCK = "randygpt.lock"


@contextmanager
def lock_run_dir(out_dir: str | None, resume: Checkpoint | None = None, check: bool = True):
    """Hold an exclusive lock on the run directory while the body runs: a second process
    (train, resume) on it is refused in one line. flock: the kernel releases the lock when its
    holder dies, even by SIGKILL, so a stale lock file never blocks anything. The run rules are
    checked again under the lock (another run may have written a checkpoint since the plan);
    a directory made here and left empty by a refused run is removed."""
    if out_dir is None:
        yield
        return
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {out_dir}: "
                        f"{e.strerror or e}; choose another {{field}}", "out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UserError(f"{out_dir} is in use by another randygpt process (pid {holder}); "
                            "wait for it to finish, or choose another {field}", "out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if check:
            _check_run_dir(out_dir, resume)
        ok = False
        try:
            yield
            ok = True
        finally:
            if not ok and created and set(os.listdir(out_dir)) <= {LOCK}:
                shutil.rmtree(out_dir, ignore_errors=True)    # a refused run leaves nothing
    finally:
        os.close(fd)           # releases the lock


def _read(text: str | None, data_path: str | None) -> str:
    if text is not None:
        return text
    if data_path is not None:
        return read_text(data_path)
    if os.path.exists("train.txt"):
        return read_text("train.txt")
    return builtin_sample_text()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
