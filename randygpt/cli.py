"""`randygpt`: flags in, library calls out. Every user mistake becomes one line and exit 2."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .config import DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig, flag_fields
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
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{s} must be a finite number >= 0")
    return v


def _parsed_by(parse):
    """An argparse type from a config field's parser (ValueError -> argparse's message)."""
    def convert(s):
        try:
            return parse(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only `command`'s part of it: a launch of `randygpt
    generate` then skips building train's forty flags (~6 ms of its start-up on a 2-core
    Xeon)."""
    parser = _Parser(prog="randygpt", description="randyGPT: a GPT you can read, trained "
                     "from scratch on your own text with hand-written NumPy math.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add, _) in COMMANDS.items():
        if command in (None, name):
            add(sub)
    return parser


# --------------------------------------------------------------------------------------------
# train: flags -> runs.plan_run -> train.train

def _add_train(sub) -> None:
    from .ops.contract import BACKENDS
    from .tokenizer import DEFAULT_BPE_VOCAB
    t = sub.add_parser("train", help="train a model on a text file",
                       description="Train a GPT on a UTF-8 text file and print a sample.")
    t.add_argument("--data", metavar="PATH", default=None,
                   help="training text (UTF-8); default: ./train.txt, else the built-in sample")
    t.add_argument("--preset", default=None, metavar="NAME", help="model size: " + ", ".join(
        "%s (%dL/%dd/%dh)" % (k, v["n_layer"], v["n_embd"], v["n_head"])
        for k, v in PRESETS.items()) + f" (default {DEFAULT_PRESET})")
    t.add_argument("--out", metavar="DIR", default=None,
                   help="run directory (default: runs/<data>-<preset>-<time>)")
    t.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help="the ops to train on: the fused numba kernels, or the readable NumPy "
                   "reference (slower; the same losses to float32 round-off), or cupy (an "
                   "NVIDIA GPU; needs the cuda extra) (default fused; the built-in sample's "
                   "demo: reference)")
    t.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="precision of the matrix products on the cupy backend: bf16 operands "
                   "with float32 accumulation; weights and checkpoints stay float32 "
                   "(default float32)")
    t.add_argument("--tf32", action="store_true",
                   help="float32 products on the GPU's tensor cores as TF32 (cupy backend)")
    for cls, title in ((ModelConfig, "model (override the preset)"), (TrainConfig, "training")):
        group = t.add_argument_group(title)
        for f in flag_fields(cls):     # default SUPPRESS: args holds only what was typed
            kind = (_parsed_by(f.metadata["parse"]) if f.metadata["parse"] else
                    {"int": _positive_int if f.metadata["positive"] else int,
                     "float": _nonneg_float}[f.type])
            default = "the preset's" if f.metadata["preset"] else f.default
            group.add_argument(_flag(f), dest=f.name, type=kind, default=argparse.SUPPRESS,
                               metavar=_flag(f)[2:].upper().replace("-", "_"),
                               help=f"{f.metadata['help']} (default {default})")
    e = t.add_argument_group("output")
    e.add_argument("--sample-tokens", type=int, default=300,
                   help="tokens of text to generate at the end (0 = none; default 300)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--exact-eval", action="store_true",
                   help="score the whole validation split (each token once) at every "
                   "evaluation and pick the best checkpoint by it (default: at the end only)")
    c = t.add_argument_group("checkpoints")
    c.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run exactly where its checkpoint left it: PATH, or without "
                        "PATH the --out directory's checkpoint.safetensors; the checkpoint's "
                        "configuration is used and --iters is the total target")
    c.add_argument("--fine-tune", metavar="PATH", default=None,
                   help="start from PATH's weights and tokenizer with a fresh optimizer and "
                        "iteration counter, on new --data")
    k = t.add_argument_group("tokenizer and documents")
    k.add_argument("--bpe", nargs="?", type=_positive_int, const=DEFAULT_BPE_VOCAB, default=None,
                   metavar="N", help="train a byte-level BPE tokenizer with N tokens (N "
                   f"default {DEFAULT_BPE_VOCAB}) instead of one token per character")
    k.add_argument("--doc-separator", metavar="STRING", default=None,
                   help="split the text into documents at STRING (\\n, \\t, \\\\ are "
                   "escapes, e.g. '\\n\\n' for a blank line); no training window spans two")
    k.add_argument("--val-split", choices=("random", "tail"), default=None,
                   help="validation data: a seeded random 10%% of the documents (default with "
                   "--doc-separator: a sorted file's tail is not like the rest), or the last "
                   "10%% of the text (default without)")
    m = t.add_argument_group("several processes: mpiexec -n N randygpt train ...")
    m.add_argument("--comm-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="end the job when the other ranks have not answered for SECONDS "
                   "(a rank died or hangs; rank 0 evaluates alone meanwhile) (default 600)")


_CONFIG_FLAGS = {f.name: f for cls in (ModelConfig, TrainConfig) for f in flag_fields(cls)}


def _flag(f) -> str:
    return "--" + (f.metadata["flag"] or f.name.replace("_", "-"))


def flag_of(field: str) -> str:
    """How the CLI spells a library field: its flag (n_embd -> --dim), else --field-name; a
    config field that is no flag (norm) stays its name."""
    if field in _CONFIG_FLAGS:
        return _flag(_CONFIG_FLAGS[field])
    if field in ModelConfig.__dataclass_fields__ or field in TrainConfig.__dataclass_fields__:
        return field
    return "--" + field.replace("_", "-")


def _process_started() -> float:
    """time.monotonic() when this process began (interpreter start-up and imports count
    against a time budget); now, where /proc does not say."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])     # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()


def cmd_train(args) -> int:
    from .distributed import open_world
    from .runs import plan_run
    from .train import train
    world = open_world(args.comm_timeout)         # this process alone unless under mpiexec
    given = {name: getattr(args, name) for name in _CONFIG_FLAGS if hasattr(args, name)}
    backend = args.backend
    if args.dtype != "float32" or args.tf32:
        if args.backend != "cupy":
            what = "dtype" if args.dtype != "float32" else "tf32"
            raise UserError("{field}" + " bf16" * (what == "dtype") + " needs --backend cupy "
                            "(the CPU backends compute in float32)", what)
        from .ops.contract import get_backend
        backend = get_backend("cupy", dtype=args.dtype, tf32=args.tf32)
    try:
        plan = world.together(lambda: plan_run(
            given, preset=args.preset, resume=args.resume, fine_tune=args.fine_tune,
            data_path=args.data, out_dir=args.out, runs_dir="runs", bpe_vocab_size=args.bpe,
            doc_separator=None if args.doc_separator is None else _unescape(args.doc_separator),
            val_split=args.val_split))
        result = train(plan, backend=backend, sample_tokens=max(0, args.sample_tokens),
                       progress=False if args.no_progress else None, world=world,
                       exact_eval=args.exact_eval, started=_process_started())
    except BaseException as e:
        if world.size > 1 and not getattr(e, "agreed", False):
            _end_job(world, e)                   # the other ranks would wait for this one
        raise
    if not world.is_root:
        return 128 + result.signal if result.signal is not None else 0
    return _finish_train(result, plan.out_dir)


def _end_job(world, e: BaseException) -> None:
    """An error on this rank alone, mid-run: say so in one line, then end every rank."""
    if isinstance(e, UserError):
        what, code = e.render(flag_of), 2
    elif isinstance(e, KeyboardInterrupt):
        what, code = "interrupted", 130
    else:
        import traceback
        traceback.print_exc()
        what, code = f"{type(e).__name__}: {e}", 1
    print(f"randygpt train: error: rank {world.rank}: {what}; ending every rank",
          file=sys.stderr)
    world.abort(code)


def _finish_train(result, out) -> int:
    """The summary of a finished run; exit 128 + signal for a run a signal stopped (130, 143)."""
    if result.signal is not None:
        return 128 + result.signal
    last = result.history[-1] if result.history else {}
    bpc, exact = last.get("val_bpc"), last.get("val_loss_exact")
    print(f"done: {result.iters_done} iterations, train loss {result.train_loss:.4f}, "
          f"val loss {result.val_loss:.4f}" + (f", val bpc {bpc:.4f}" if bpc is not None else "") +
          (f", exact val loss {exact:.4f}" if exact is not None else "") +
          f"; metrics in {os.path.join(out, 'metrics.jsonl')}, "
          f"checkpoint in {result.checkpoint}")
    if result.sample:
        print("--- sample ---")
        print(result.sample)
    return 0


# --------------------------------------------------------------------------------------------
# checkpoints and tokenizers: `randygpt info` and `randygpt export-tokenizer`

def _add_info(sub) -> None:
    i = sub.add_parser("info", help="describe a checkpoint",
                       description="Print a checkpoint's model configuration, parameter count, "
                       "iteration, best val loss, tokenizer and file size.")
    i.add_argument("path", metavar="PATH", help="checkpoint file (or a run directory)")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw runs' loss curves as a PNG",
                       description="Draw the train and val loss curves of runs (their "
                       "metrics.jsonl) as a PNG. One run: the picture training draws, with "
                       "tokens seen and the learning rate (default RUN/loss.png). Several: one "
                       "picture comparing them, a colour per run, val solid and train dashed "
                       "(default ./runs-compare.png). Needs the plots extra: "
                       "pip install -e '.[plots]'.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (or its metrics.jsonl)")
    p.add_argument("-o", "--out", metavar="FILE.png", default=None,
                   help="picture to write (default: RUN/loss.png for one run, "
                   "./runs-compare.png for several)")


def cmd_plot(args) -> int:
    from .plot import COMPARISON, write_comparison, write_run_picture
    if len(args.runs) == 1:
        path = write_run_picture(args.runs[0], args.out)
    else:
        path = write_comparison(args.runs, args.out or COMPARISON)
    print(f"wrote {path}")
    return 0


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
    tok = load_checkpoint(args.checkpoint, optimizer=False).tokenizer
    export_tokenizer_json(tok, out)
    print(f"wrote {out}: {tok.kind} tokenizer, {tok.vocab_size} tokens "
          f"(BOS id {tok.bos_id}, EOS id {tok.eos_id})")
    return 0


def _add_import_hf(sub) -> None:
    i = sub.add_parser("import-hf", help="a Hugging Face GPT-2 folder -> a checkpoint",
                       description="Read a local Hugging Face GPT-2 folder (config.json, "
                       "model.safetensors, tokenizer.json or vocab.json + merges.txt) and write "
                       "it as a randyGPT checkpoint for generate, eval and train --fine-tune.")
    i.add_argument("dir", metavar="DIR", help="the folder (nothing is downloaded)")
    i.add_argument("out", metavar="OUT.safetensors", help="checkpoint file to write")
    i.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def _add_export_hf(sub) -> None:
    x = sub.add_parser("export-hf", help="a GPT-2-variant checkpoint -> a Hugging Face folder",
                       description="Write a GPT-2-variant checkpoint as a folder that "
                       "transformers' GPT2LMHeadModel.from_pretrained and "
                       "AutoTokenizer.from_pretrained load.")
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (or a run directory)")
    x.add_argument("dir", metavar="DIR", help="folder to write (new or empty)")
    x.add_argument("--force", action="store_true", help="write into DIR even if not empty")


def cmd_import_hf(args) -> int:
    from .hf import import_hf
    model, tok = import_hf(args.dir, args.out, force=args.force)
    c = model.cfg
    print(f"wrote {args.out}: GPT-2, {c.n_layer} layers, {c.n_embd} dim, {c.n_head} heads, "
          f"{c.block_size} positions, {model.num_params:,} parameters; {tok.kind} tokenizer, "
          f"{tok.vocab_size} tokens")
    return 0


def cmd_export_hf(args) -> int:
    from .hf import export_hf
    export_hf(args.checkpoint, args.dir, force=args.force)
    print(f"wrote {args.dir}: config.json, model.safetensors and the tokenizer's files")
    return 0


def cmd_info(args) -> int:
    import json

    from .checkpoint import load_checkpoint, summary
    s = summary(load_checkpoint(args.path))
    if args.json:
        print(json.dumps(s))
        return 0
    m, t, tok = s["model_config"], s["train_config"], s["tokenizer"]
    best = (f"{s['best_val_loss']:.4f}" if s["best_val_loss"] is not None else
            "none (no checkpoint_best.safetensors beside it)")
    print(f"checkpoint: {s['path']} ({s['file_size']:,} bytes, format version "
          f"{s['format_version']})")
    print(f"model: {m['n_layer']} layers, {m['n_embd']} dim, {m['n_head']} heads, block "
          f"{m['block_size']}, vocab {m['vocab_size']}, dropout {m['dropout']}: "
          f"{s['num_params']:,} parameters")
    sched = s["schedule"] or {}
    of = (f" of {sched['target']}" + ("" if sched.get("fixed", True) else " (so far)")
          if sched else f" of {t['iters']}" if t else "")
    print(f"iteration: {s['iter']}{of}; best val loss: {best}")
    if t and t.get("time_budget"):
        print(f"time budget: {sched.get('elapsed_s', 0):.0f} s of {t['time_budget']:g} s used"
              + {"time": "; it ran out", "early_stop": ""}.get(sched.get("stopped"), ""))
    if sched.get("stopped") == "early_stop":
        print(f"stopped early: the val loss had not improved for {sched['stalled']} "
              "evaluations")
    if sched.get("lr_scale", 1.0) != 1.0:
        print(f"LR scale after plateaus: {sched['lr_scale']:g}")
    print(f"tokenizer: {tok['kind']}, {tok['vocab_size']} tokens")
    print("optimizer state: " + (f"yes (step {s['optimizer_step']})"
                                 if s["has_optimizer_state"] else "no (weights only)"))
    if t:
        print("training: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return 0


# --------------------------------------------------------------------------------------------
# generate and eval: a checkpoint in, text or numbers out. Imports stay inside the functions so
# that `randygpt generate` starts fast (no numba, tqdm or tokenizers on this path).

def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a trained model",
                       description="Continue a prompt with a trained model, streaming the text "
                       "to stdout as it is made (only the completion, unless --echo).")
    _add_checkpoint_flags(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", metavar="TEXT",
                     help="text to continue; empty: start a new document (from BOS)")
    src.add_argument("--prompt-file", metavar="F",
                     help="read the prompt from a UTF-8 file ('-': standard input)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--bos", dest="bos", action="store_true", default=None,
                   help="the prompt begins a new document: BOS, then the prompt (default for a "
                   "model trained with --doc-separator)")
    b.add_argument("--no-bos", dest="bos", action="store_false",
                   help="the prompt continues a text (default for a model trained without "
                   "--doc-separator)")
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
    g.add_argument("--separator", metavar="S", default=None,
                   help="print S between samples instead of a line '---' (\\n etc. are "
                   "escapes: --separator '\\n' prints one sample per line)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="measure a model's loss on a text file",
                       description="Loss per token, perplexity and bits per character of a model "
                       "on a text, over the whole text in non-overlapping block-sized windows.")
    _add_checkpoint_flags(e)
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    e.add_argument("--doc-separator", metavar="STRING", default=None,
                   help="score the text as documents split at STRING, each framed BOS ... EOS "
                   "as training frames them (use the separator the model was trained with)")
    e.add_argument("--stride", type=_positive_int, default=None, metavar="S",
                   help="sliding windows: each window after the first scores S new tokens, so "
                   "every token sees at least block-S tokens of context (1: full context; "
                   "default: non-overlapping windows)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_checkpoint_flags(p) -> None:
    c = p.add_mutually_exclusive_group()
    c.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint file (default: the best checkpoint of the most recent run "
                        "under ./runs)")
    c.add_argument("--run", metavar="DIR",
                   help="run directory: its checkpoint_best.safetensors, else its latest")


def _load_model(args):
    from .checkpoint import find_checkpoint, load_checkpoint
    path = find_checkpoint(args.checkpoint, args.run)
    if args.checkpoint is None and args.run is None:
        print(f"randygpt {args.command}: using {path}", file=sys.stderr)
    return load_checkpoint(path, optimizer=False)    # these commands use no optimizer state


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


MAX_PROMPT_BYTES = 16 << 20


def cmd_generate(args) -> int:
    from .sample import SamplingConfig
    from .session import generate
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    if args.num_samples < 1:
        raise UserError("{field} %d must be at least 1" % args.num_samples, "num_samples")
    stops = [_unescape(s) for s in args.stop]
    prompt = args.prompt
    if args.prompt_file == "-":
        try:
            prompt = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1).decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("the prompt on standard input is not valid UTF-8") from None
    elif args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UserError(f"prompt file {args.prompt_file!r} does not exist")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except UnicodeDecodeError:
            raise UserError(f"prompt file {args.prompt_file!r} is not valid UTF-8") from None
    if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise UserError(f"the prompt is over {MAX_PROMPT_BYTES >> 20} MiB; a model sees only "
                        "its last block of tokens: pass the end of it")
    separator = "\n---\n" if args.separator is None else _unescape(args.separator)
    ckpt = _load_model(args)
    import numpy as np

    from .blas import set_blas_threads
    from .sample import encode_prompt
    bos = args.bos
    if bos is None:         # a document-trained model saw every document start at BOS
        bos = ckpt.meta.data is not None and ckpt.meta.data.doc_separator is not None
    ids = encode_prompt(ckpt.tokenizer, prompt, bos=bos)
    set_blas_threads(1)        # one vector at a time: more BLAS threads only wait (see blas.py)
    rng = np.random.default_rng(args.seed)
    out = sys.stdout
    try:
        for i in range(args.num_samples):
            events = generate(ckpt.model, ckpt.tokenizer, ids, args.max_tokens, sampling,
                              stops, rng)           # validates the settings before any output
            if i:
                out.write(separator)
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
    sep = None if args.doc_separator is None else _unescape(args.doc_separator)
    trained_with = (ckpt.meta.data.doc_separator if ckpt.meta.data else None)
    if sep is None and trained_with is not None:
        print(f"randygpt eval: note: this model was trained on documents split at "
              f"{trained_with!r}; pass --doc-separator to score the text as it was trained",
              file=sys.stderr)
    r = evaluate_text(ckpt.model, ckpt.tokenizer, text, separator=sep, stride=args.stride)
    if args.json:
        print(json.dumps(dict(checkpoint=ckpt.path, data=args.data, **r.to_dict())))
    else:
        print(f"{args.data}: {r.tokens:,} tokens, {r.chars:,} characters, {r.windows:,} "
              f"windows of {ckpt.model_config.block_size}")
        print(f"loss {r.loss:.4f} nats/token, perplexity {r.perplexity:.3f}, "
              f"{r.bits_per_char:.4f} bits/char")
    return 0


# --------------------------------------------------------------------------------------------
# serve: a checkpoint behind an OpenAI-compatible HTTP API (randygpt/serve, the `serve` extra)

def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a checkpoint: /v1/completions, /v1/chat/completions, "
                       "/v1/models, /tokenize, /detokenize, /health and a playground page at "
                       "/. Needs the serve extra: pip install -e '.[serve]'.")
    _add_checkpoint_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: "
                        "$RANDYGPT_API_KEY, else none)")
    s.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="streams decoded together in one batched step (default 8)")
    s.add_argument("--queue", type=int, default=64, metavar="N",
                   help="choices that may wait for a free stream; more get 429 (default 64)")
    s.add_argument("--max-tokens-cap", type=_positive_int, default=1024, metavar="N",
                   help="the largest max_tokens a request may ask for (default 1024)")
    s.add_argument("--user-name", default="User", metavar="NAME",
                   help="the user's speaker name in the chat transcript (default User)")
    s.add_argument("--assistant-name", default="Assistant", metavar="NAME",
                   help="the model's speaker name in the chat transcript (default Assistant)")
    s.add_argument("--backend", choices=("fused", "reference"), default="fused",
                   help="fused (default): compiled kernels, one compiled call per decode "
                        "step for all streams (compiled at the first start, then loaded from "
                        "disk); reference: the readable NumPy ops, no numba")


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serving needs fastapi and uvicorn: pip install -e '.[serve]'") from None
    from .blas import set_blas_threads
    from .serve.app import Limits, create_app
    from .serve.chat import ChatTemplate
    set_blas_threads(1)    # the decode thread multiplies (streams, C) blocks: see blas.py
    if not 0 < args.port < 65536:
        raise UserError(f"{{field}} {args.port} must be in 1..65535", "port")
    if args.queue < 0:
        raise UserError(f"{{field}} {args.queue} must be >= 0", "queue")
    key = args.api_key or os.environ.get("RANDYGPT_API_KEY") or None
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"randygpt serve: warning: {args.host} is reachable from other machines and no "
              "API key is set (--api-key or RANDYGPT_API_KEY): anyone can use this server",
              file=sys.stderr)
    ckpt = _load_model(args)
    if args.backend != "reference":
        ckpt = _serving_on(ckpt, args.backend)
    app = create_app(ckpt, api_key=key, max_batch=args.max_batch, queue=args.queue,
                     limits=Limits(max_tokens_cap=args.max_tokens_cap),
                     chat=ChatTemplate(args.user_name, args.assistant_name))
    print(f"randygpt serve: {ckpt.path} as '{app.state.model_id}' on "
          f"http://{args.host}:{args.port}/ (playground at /)", file=sys.stderr)
    # keep-alive 30 s (uvicorn's default is 5): a client's pooled connection outlives a pause
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0


def _serving_on(ckpt, backend):
    """The checkpoint with its model on `backend`, kernels compiled (or loaded) before the
    first client: a first start on a machine compiles them once, with a notice."""
    import dataclasses

    from .session import warm_up
    model = ckpt.model.on_backend(backend)
    cold = model.compile_decode()          # its decode step is not in numba's disk cache
    if cold:
        print("randygpt serve: compiling fast kernels once (later starts load them from "
              "disk) ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    warm_up(model)
    if cold:
        print(f"randygpt serve: compiled in {time.monotonic() - started:.1f} s",
              file=sys.stderr)
    return dataclasses.replace(ckpt, model=model)


# each command: the function that adds its flags, the one that runs it (in --help's order)
COMMANDS = {"train": (_add_train, cmd_train), "generate": (_add_generate, cmd_generate),
            "eval": (_add_eval, cmd_eval), "info": (_add_info, cmd_info),
            "plot": (_add_plot, cmd_plot),
            "export-tokenizer": (_add_export_tokenizer, cmd_export_tokenizer),
            "import-hf": (_add_import_hf, cmd_import_hf),
            "export-hf": (_add_export_hf, cmd_export_hf), "serve": (_add_serve, cmd_serve)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except UserError as e:
        if not getattr(e, "quiet", False):     # of several MPI ranks, one says it
            print(f"randygpt {args.command}: error: {e.render(flag_of)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"randygpt {args.command}: interrupted", file=sys.stderr)
        return 130
