"""`randygpt`: flags in, library calls out. Every user mistake becomes one line and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .config import DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _nonneg_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{s} must be a number >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="randygpt", description="randyGPT: a GPT you can read, trained "
                     "from scratch on your own text with hand-written NumPy math.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model on a text file",
                       description="Train a GPT on a UTF-8 text file and print a sample.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    t.add_argument("--data", metavar="PATH", default=None,
                   help="training text (UTF-8); default: ./train.txt, else the built-in sample")
    t.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                   help="model size: " + ", ".join(
                       "%s (%dL/%dd/%dh)" % (k, v["n_layer"], v["n_embd"], v["n_head"])
                       for k, v in PRESETS.items()))
    t.add_argument("--iters", type=_positive_int, default=d.iters,
                   help="total training iterations (the target when resuming)")
    t.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for metrics.jsonl (default: runs/<data>-<preset>-<time>)")
    t.add_argument("--seed", type=int, default=d.seed,
                   help="seed for init, batches and dropout; same seed + threads = same losses")
    g = t.add_argument_group("model (override the preset)")
    g.add_argument("--layers", type=_positive_int, help="number of transformer blocks")
    g.add_argument("--dim", type=_positive_int, help="embedding width C")
    g.add_argument("--heads", type=_positive_int, help="attention heads (must divide --dim)")
    g.add_argument("--block", type=_positive_int, help="context length in tokens")
    g.add_argument("--dropout", type=_nonneg_float, help="dropout probability (default 0.1)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--batch", type=_positive_int, help="sequences per step (preset's)")
    o.add_argument("--lr", type=_nonneg_float, default=d.lr, help="peak learning rate")
    o.add_argument("--min-lr", type=_nonneg_float, default=d.min_lr,
                   help="learning rate at the end of the cosine decay")
    o.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup iterations")
    o.add_argument("--decay-frac", type=_nonneg_float, default=d.decay_frac,
                   help="final fraction of the run over which the LR decays (cosine)")
    o.add_argument("--beta2", type=_nonneg_float, default=d.beta2, help="AdamW beta2")
    o.add_argument("--weight-decay", type=_nonneg_float, default=d.weight_decay,
                   help="AdamW decoupled weight decay (matrices only)")
    o.add_argument("--grad-clip", type=_nonneg_float, default=d.grad_clip,
                   help="clip the global gradient L2 norm to this (0 = off)")
    e = t.add_argument_group("evaluation and output")
    e.add_argument("--eval-interval", type=_positive_int, default=d.eval_interval,
                   help="evaluate every N iterations")
    e.add_argument("--eval-iters", type=_positive_int, default=d.eval_iters,
                   help="batches per loss estimate")
    e.add_argument("--sample-tokens", type=int, default=300,
                   help="characters of text to generate at the end (0 = none)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def configs_from_args(args) -> tuple[ModelConfig, TrainConfig]:
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    p = dict(PRESETS[args.preset])
    mcfg = ModelConfig(
        n_layer=args.layers or p["n_layer"], n_embd=args.dim or p["n_embd"],
        n_head=args.heads or p["n_head"], block_size=args.block or p["block_size"],
        dropout=args.dropout if args.dropout is not None else ModelConfig.dropout)
    tcfg = TrainConfig(
        iters=args.iters, batch_size=args.batch or p["batch_size"], lr=args.lr,
        min_lr=args.min_lr, warmup=args.warmup, decay_frac=args.decay_frac, beta2=args.beta2,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, seed=args.seed)
    try:
        mcfg.validate()
        tcfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return mcfg, tcfg


def cmd_train(args) -> int:
    from .train import train
    mcfg, tcfg = configs_from_args(args)
    out = args.out
    if out is None:
        stem = os.path.splitext(os.path.basename(args.data or "train.txt"))[0]
        if args.data is None and not os.path.exists("train.txt"):
            stem = "sample"
        out = os.path.join("runs", f"{stem}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(mcfg, tcfg, data_path=args.data, out_dir=out,
                   sample_tokens=max(0, args.sample_tokens),
                   progress=False if args.no_progress else None)
    print(f"done: {result.iters_done} iterations, train loss {result.train_loss:.4f}, "
          f"val loss {result.val_loss:.4f}; metrics in {os.path.join(out, 'metrics.jsonl')}")
    if result.sample:
        print("--- sample ---")
        print(result.sample)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": cmd_train}
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"randygpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"randygpt {args.command}: interrupted", file=sys.stderr)
        return 130
