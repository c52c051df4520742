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
    o.add_argument("--reference-ops", action="store_true",
                   help="train on the readable NumPy reference ops instead of the fused numba "
                   "kernels (slower; the same losses to float32 round-off)")
    e = t.add_argument_group("evaluation and output")
    e.add_argument("--eval-interval", type=_positive_int, default=d.eval_interval,
                   help="evaluate every N iterations")
    e.add_argument("--eval-iters", type=_positive_int, default=d.eval_iters,
                   help="batches per loss estimate")
    e.add_argument("--sample-tokens", type=int, default=300,
                   help="characters of text to generate at the end (0 = none)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_generate_and_eval(sub)
    _add_checkpoint_train_flags(t)
    _add_tokenizer_flags(t)
    _add_info(sub)
    _add_export_tokenizer(sub)
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
    if args.resume is not None or args.fine_tune is not None:
        if args.bpe is not None:
            raise UserError(f"--bpe trains a new tokenizer, but --"
                            f"{'resume' if args.resume is not None else 'fine-tune'} keeps the "
                            "checkpoint's: drop --bpe")
        return _train_from_checkpoint(args)
    mcfg, tcfg = configs_from_args(args)
    if _on_builtin_sample(args):
        given = flags_given(args._argv)
        if "iters" not in given:
            tcfg.iters = SAMPLE_ITERS
            if "eval_interval" not in given:
                tcfg.eval_interval = SAMPLE_ITERS // 8
            print(f"the built-in sample is only a few KB: training {SAMPLE_ITERS} iterations "
                  "(longer runs only memorise it; --iters N to choose)")
    out = args.out or _default_out(args, args.preset)
    result = train(mcfg, tcfg, data_path=args.data, out_dir=out,
                   sample_tokens=max(0, args.sample_tokens),
                   progress=False if args.no_progress else None, bpe_vocab_size=args.bpe,
                   **_data_options(args, out), reference_ops=args.reference_ops)
    return _finish_train(result, out)


# On the ~5 KB built-in sample the small preset's val loss is lowest after ~150 iterations and
# then climbs as it memorises the text (measured: 2.25 at 150, 2.65 at 300, 3.54 at 500 of a
# 2000-iteration run): a demo run stops near the minimum.
SAMPLE_ITERS = 200


def _on_builtin_sample(args) -> bool:
    return args.data is None and not os.path.exists("train.txt")


def _default_out(args, tag: str) -> str:
    stem = os.path.splitext(os.path.basename(args.data or "train.txt"))[0]
    if _on_builtin_sample(args):
        stem = "sample"
    return os.path.join("runs", f"{stem}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")


def _finish_train(result, out) -> int:
    """The summary of a finished run; exit 128 + signal for a run a signal stopped (130, 143)."""
    if result.signal is not None:
        return 128 + result.signal
    bpc = result.history[-1].get("val_bpc") if result.history else None
    print(f"done: {result.iters_done} iterations, train loss {result.train_loss:.4f}, "
          f"val loss {result.val_loss:.4f}" + (f", val bpc {bpc:.4f}" if bpc is not None else "") +
          f"; metrics in {os.path.join(out, 'metrics.jsonl')}, "
          f"checkpoint in {result.checkpoint}")
    if result.sample:
        print("--- sample ---")
        print(result.sample)
    return 0


# --------------------------------------------------------------------------------------------
# checkpoints: train --resume / --fine-tune, and `randygpt info`

# train flag (argparse dest) -> the config field it sets
_MODEL_FLAGS = {"layers": "n_layer", "dim": "n_embd", "heads": "n_head", "block": "block_size",
                "dropout": "dropout"}
_TRAIN_FLAGS = {"batch": "batch_size", "lr": "lr", "min_lr": "min_lr", "warmup": "warmup",
                "decay_frac": "decay_frac", "beta2": "beta2", "weight_decay": "weight_decay",
                "grad_clip": "grad_clip", "eval_interval": "eval_interval",
                "eval_iters": "eval_iters", "seed": "seed"}
_SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "block_size")


def _add_checkpoint_train_flags(t) -> None:
    c = t.add_argument_group("checkpoints")
    c.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run exactly where its checkpoint left it: PATH, or without "
                        "PATH the --out directory's checkpoint.safetensors; the checkpoint's "
                        "configuration is used and --iters is the total target")
    c.add_argument("--fine-tune", metavar="PATH", default=None,
                   help="start from PATH's weights and tokenizer with a fresh optimizer and "
                        "iteration counter, on new --data")


def _add_info(sub) -> None:
    i = sub.add_parser("info", help="describe a checkpoint",
                       description="Print a checkpoint's model configuration, parameter count, "
                       "iteration, best val loss, tokenizer and file size.")
    i.add_argument("path", metavar="PATH", help="checkpoint file (or a run directory)")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def flags_given(argv) -> set[str]:
    """The dests of the options typed on the command line. argparse fills in defaults without
    saying so, so parse once more with every subcommand default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    return {k for k, v in given.items() if v is not argparse.SUPPRESS} - {"command"}


def _explicit_config(args, given) -> dict:
    """config field -> (the flag as typed, its value), for every field the command line sets."""
    out = {}
    if "preset" in given:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        out = {f: (f"--preset {args.preset}", v) for f, v in PRESETS[args.preset].items()}
    for dest, field in {**_MODEL_FLAGS, **_TRAIN_FLAGS}.items():
        if dest in given:
            value = getattr(args, dest)
            out[field] = (f"--{dest.replace('_', '-')} {value}", value)
    return out


def _refuse_contradictions(explicit, config: dict, fields, path, rule) -> None:
    by_flag: dict[str, list[str]] = {}
    for field, (flag, value) in explicit.items():
        if field in fields and value != config[field]:
            by_flag.setdefault(flag, []).append(f"{field} {config[field]}")
    bad = [f"{flag} (the checkpoint has {', '.join(theirs)})" for flag, theirs in by_flag.items()]
    if bad:
        raise UserError(f"{', '.join(bad)}: contradicts the checkpoint {path}; {rule}")


def _train_from_checkpoint(args) -> int:
    from dataclasses import replace

    from .checkpoint import LATEST, load_checkpoint
    from .train import train
    if args.resume is not None and args.fine_tune is not None:
        raise UserError("--resume and --fine-tune exclude each other: resume continues a run, "
                        "fine-tune starts a new one from a checkpoint's weights")
    given = flags_given(args._argv)
    explicit = _explicit_config(args, given)
    progress = False if args.no_progress else None
    if args.resume is not None:
        path = args.resume
        if path == "":
            if args.out is None:
                raise UserError("--resume without a PATH continues the run in --out DIR: pass "
                                "--out DIR, or --resume PATH")
            path = os.path.join(args.out, LATEST)
            if not os.path.exists(path):
                raise UserError(f"{args.out} holds no {LATEST} to resume; train without "
                                "--resume to start a new run there")
        ckpt = load_checkpoint(path)
        if ckpt.train_config is None or ckpt.optimizer_state is None:
            raise UserError(f"{ckpt.path} holds weights only (no optimizer or training state), "
                            "so it cannot be resumed; use --fine-tune PATH to start from it")
        advice = ("on --resume the checkpoint's configuration is used: drop the flag, or "
                  "start a new run (or --fine-tune) to change it")
        _refuse_contradictions(explicit, {**ckpt.model_config.to_dict(),
                                          **ckpt.train_config.to_dict()},
                               [*_MODEL_FLAGS.values(), *_TRAIN_FLAGS.values()], ckpt.path, advice)
        tcfg = replace(ckpt.train_config,
                       iters=args.iters if "iters" in given else ckpt.train_config.iters)
        data = args.data if args.data is not None else ckpt.meta.get("data", {}).get("path")
        out = args.out or os.path.dirname(os.path.abspath(ckpt.path))
        result = train(replace(ckpt.model_config), tcfg, data_path=data, out_dir=out,
                       sample_tokens=max(0, args.sample_tokens), progress=progress, resume=ckpt,
                       **_data_options(args, out), reference_ops=args.reference_ops)
        return _finish_train(result, out)

    ckpt = load_checkpoint(args.fine_tune)
    _refuse_contradictions(explicit, ckpt.model_config.to_dict(), _SHAPE_FIELDS, ckpt.path,
                           "fine-tuning keeps the checkpoint's model shape: drop the flag")
    for dest, field in _MODEL_FLAGS.items():     # the shape comes from the checkpoint
        if field in _SHAPE_FIELDS or dest not in given:
            setattr(args, dest, getattr(ckpt.model_config, field))
    mcfg, tcfg = configs_from_args(args)
    out = args.out or _default_out(args, "finetune")
    result = train(mcfg, tcfg, data_path=args.data, out_dir=out,
                   sample_tokens=max(0, args.sample_tokens), progress=progress, fine_tune=ckpt,
                   **_data_options(args, out), reference_ops=args.reference_ops)
    return _finish_train(result, out)


# --------------------------------------------------------------------------------------------
# tokenizer and documents: train --bpe / --doc-separator, and `randygpt export-tokenizer`

def _add_tokenizer_flags(t) -> None:
    from .tokenizer import DEFAULT_BPE_VOCAB
    k = t.add_argument_group("tokenizer and documents")
    k.add_argument("--bpe", nargs="?", type=_positive_int, const=DEFAULT_BPE_VOCAB, default=None,
                   metavar="N", help="train a byte-level BPE tokenizer with N tokens (N "
                   f"default {DEFAULT_BPE_VOCAB}) instead of one token per character")
    k.add_argument("--doc-separator", metavar="STRING", default=None,
                   help="split the text into documents at STRING (\\n, \\t, \\\\ are "
                   "escapes, e.g. '\\n\\n' for a blank line); no training window spans two")


def _data_options(args, out: str) -> dict:
    """train() keywords for documents and the token cache: the cache is the folder
    token-cache next to the run directory, shared by runs on the same text."""
    sep = None if args.doc_separator is None else _unescape(args.doc_separator)
    cache = os.path.join(os.path.dirname(os.path.normpath(out)), "token-cache")
    return dict(doc_separator=sep, cache_dir=cache)


def _add_export_tokenizer(sub) -> None:
    x = sub.add_parser("export-tokenizer", help="write a checkpoint's tokenizer as tokenizer.json",
                       description="Write the tokenizer inside a checkpoint as a standard "
                       "tokenizer.json that tokenizers.Tokenizer.from_file loads (a char "
                       "tokenizer becomes an equivalent one-character WordLevel model).")
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (or a run directory)")
    x.add_argument("out", metavar="OUT.json", help="file to write (a folder: OUT/tokenizer.json)")
    x.add_argument("--force", action="store_true", help="overwrite OUT.json if it exists")


def cmd_export_tokenizer(args) -> int:
    from .checkpoint import load_checkpoint
    from .tokenizer import export_tokenizer_json
    out = args.out
    if os.path.isdir(out):
        out = os.path.join(out, "tokenizer.json")
    if os.path.exists(out) and not args.force:
        raise UserError(f"{out} already exists; pass --force to overwrite it, or another path")
    tok = load_checkpoint(args.checkpoint).tokenizer
    export_tokenizer_json(tok, out)
    print(f"wrote {out}: {tok.kind} tokenizer, {tok.vocab_size} tokens "
          f"(BOS id {tok.bos_id}, EOS id {tok.eos_id})")
    return 0


def cmd_info(args) -> int:
    import json

    from .checkpoint import load_checkpoint, summary
    s = summary(load_checkpoint(args.path))
    if args.json:
        print(json.dumps(s))
        return 0
    m, t, tok = s["model_config"], s["train_config"], s["tokenizer"]
    best = "none yet" if s["best_val_loss"] is None else f"{s['best_val_loss']:.4f}"
    print(f"checkpoint: {s['path']} ({s['file_size']:,} bytes, format version "
          f"{s['format_version']})")
    print(f"model: {m['n_layer']} layers, {m['n_embd']} dim, {m['n_head']} heads, block "
          f"{m['block_size']}, vocab {m['vocab_size']}, dropout {m['dropout']}: "
          f"{s['num_params']:,} parameters")
    print(f"iteration: {s['iter']}" + (f" of {t['iters']}" if t else "") +
          f"; best val loss: {best}")
    print(f"tokenizer: {tok['kind']}, {tok['vocab_size']} tokens")
    print("optimizer state: " + (f"yes (step {s['optimizer_step']})"
                                 if s["has_optimizer_state"] else "no (weights only)"))
    if t:
        print("training: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return 0


# --------------------------------------------------------------------------------------------
# generate and eval: a checkpoint in, text or numbers out. Imports stay inside the functions so
# that `randygpt generate` starts fast (no numba, tqdm or tokenizers on this path).

def _add_generate_and_eval(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a trained model",
                       description="Continue a prompt with a trained model, streaming the text "
                       "to stdout as it is made (only the completion, unless --echo).")
    _add_checkpoint_flags(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", metavar="TEXT",
                     help="text to continue; empty: start a new document (from BOS)")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    g.add_argument("--max-tokens", type=int, default=500, metavar="N",
                   help="stop after N new tokens (default 500)")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="divide the logits by T; 0 = greedy, always the likeliest token "
                        "(default 0.8)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only from the K likeliest tokens (default 0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="then only from the smallest set of those tokens with probability "
                        ">= P (default 1 = all)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed: the same seed gives the same text (default: random)")
    g.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S",
                   help="stop before the first of these strings (not printed); "
                        "\\n, \\t and \\\\ are read as newline, tab, backslash")
    g.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="independent samples, separated by a line '---' (default 1)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")

    e = sub.add_parser("eval", help="measure a model's loss on a text file",
                       description="Loss per token, perplexity and bits per character of a model "
                       "on a text, over the whole text in non-overlapping block-sized windows.")
    _add_checkpoint_flags(e)
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_checkpoint_flags(p) -> None:
    c = p.add_mutually_exclusive_group()
    c.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint file (default: the best checkpoint of the most recent run "
                        "under ./runs)")
    c.add_argument("--run", metavar="DIR",
                   help="run directory: its checkpoint_best.safetensors, else its latest")


def find_checkpoint(checkpoint=None, run=None, runs_dir="runs") -> str:
    """--checkpoint as given; --run's best (else latest) checkpoint; else the best checkpoint
    of the most recently modified run directory under runs_dir that has one."""
    from .checkpoint import BEST, LATEST
    if checkpoint is not None:
        return checkpoint
    if run is not None:
        for name in (BEST, LATEST):
            if os.path.isfile(os.path.join(run, name)):
                return os.path.join(run, name)
        raise UserError(f"run directory {run!r} has no {BEST} or {LATEST}; "
                        "pass --checkpoint PATH or a run that has been trained")
    runs = []
    if os.path.isdir(runs_dir):
        runs = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)
                if os.path.isfile(os.path.join(runs_dir, d, BEST))]
    if not runs:
        raise UserError(f"no checkpoint given and no run under ./{runs_dir} has a {BEST}; "
                        "train one with 'randygpt train' or pass --checkpoint PATH")
    return os.path.join(max(runs, key=os.path.getmtime), BEST)


def _load_model(args):
    from .checkpoint import load_checkpoint
    path = find_checkpoint(args.checkpoint, args.run)
    if args.checkpoint is None and args.run is None:
        print(f"randygpt {args.command}: using {path}", file=sys.stderr)
    return load_checkpoint(path)


def _unescape(s: str) -> str:
    """'\\n' typed on a command line -> a newline (also \\t, \\r and \\\\)."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in table:
            out.append(table[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def cmd_generate(args) -> int:
    from .sample import SamplingConfig
    from .session import generate
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    if args.num_samples < 1:
        raise UserError("{field} %d must be at least 1" % args.num_samples, "num_samples")
    stops = [_unescape(s) for s in args.stop]
    prompt = args.prompt
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UserError(f"prompt file {args.prompt_file!r} does not exist")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except UnicodeDecodeError:
            raise UserError(f"prompt file {args.prompt_file!r} is not valid UTF-8") from None
    ckpt = _load_model(args)
    import numpy as np

    from .blas import set_blas_threads
    set_blas_threads(1)        # one vector at a time: more BLAS threads only wait (see blas.py)
    rng = np.random.default_rng(args.seed)
    out = sys.stdout
    try:
        for i in range(args.num_samples):
            events = generate(ckpt.model, ckpt.tokenizer, prompt, args.max_tokens, sampling,
                              stops, rng)           # validates the prompt before any output
            if i:
                out.write("---\n")
            if args.echo:
                out.write(prompt)
            for event in events:
                out.write(event.text)
                out.flush()
            out.write("\n")
            out.flush()
    except BrokenPipeError:       # the reader left (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_eval(args) -> int:
    import json

    from .data import read_text
    from .evaluate import evaluate_text
    text = read_text(args.data)
    ckpt = _load_model(args)
    r = evaluate_text(ckpt.model, ckpt.tokenizer, text)
    if args.json:
        print(json.dumps(dict(checkpoint=ckpt.path, data=args.data, **r.to_dict())))
    else:
        print(f"{args.data}: {r.tokens:,} tokens, {r.chars:,} characters, {r.windows:,} "
              f"windows of {ckpt.model_config.block_size}")
        print(f"loss {r.loss:.4f} nats/token, perplexity {r.perplexity:.3f}, "
              f"{r.bits_per_char:.4f} bits/char")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args._argv = argv            # flags_given() needs what was typed, not the defaults
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "info": cmd_info,
                "export-tokenizer": cmd_export_tokenizer}
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"randygpt {args.command}: error: "
              f"{e.render(lambda f: '--' + f.replace('_', '-'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"randygpt {args.command}: interrupted", file=sys.stderr)
        return 130
