"""Checkpoints: one safetensors file holding everything a run needs to continue or to generate.

    tensors   <param name>             the model weights, float32, shapes from the model config
              adam.m.<name>, adam.v.<name>   AdamW's two moments for every parameter (optional)
    metadata  format   = "randygpt"
              randygpt = one JSON string: model_config, tokenizer and the CheckpointMeta
                         fields (format_version, iter, train_config, optimizer_step,
                         best_val_loss, rng states, data, ...)
              sha256   = digest of that JSON and of every tensor's name, dtype, shape and bytes
              sha256_weights = the same digest without the AdamW moments (files that have
                         them): generation reads and checks the weights alone, a third of
                         the bytes; a full load checks both (older files have sha256 only)

safetensors never runs code on load (no pickle), and it checks the header's layout; the digest
catches what it cannot: damaged bytes inside tensor data or inside the metadata. Writes are
atomic (temp file in the same directory, fsync, os.replace, fsync the directory), so a reader
never sees half a file and the previous checkpoint survives a crash at any instant.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, replace

import numpy as np

from .config import ModelConfig, TrainConfig
from .errors import UserError
from .model import GPT, FlatTensors, parameter_shapes
from .ops.reference import array_module
from .schedule import ScheduleState
from .tokenizer import tokenizer_from_dict

FORMAT_VERSION = 1
FORMAT_NAME = "randygpt"
LATEST = "checkpoint.safetensors"          # names inside a run directory
BEST = "checkpoint_best.safetensors"
_MOMENTS = ("adam.m.", "adam.v.")
_RNG_KINDS = {"PCG64": np.random.PCG64}    # bit generators we will rebuild (never getattr by name)
_MAX_HEADER = 100 << 20                    # safetensors' own limit on the JSON header
_DTYPES = {"F64": "float64", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass
class DataInfo:
    """What a run trained on; a resume must see the same text and documents."""
    path: str | None = None
    sha256: str | None = None
    doc_separator: str | None = None
    documents: int | None = None
    train_tokens: int | None = None
    val_tokens: int | None = None
    val_split: str | None = None      # "random" or "tail" (None: written before it existed: tail)


@dataclass
class CheckpointMeta:
    """The training state stored beside the weights (the JSON metadata; model_config and
    tokenizer live there too but are Checkpoint's). All optional on disk: a weights-only
    checkpoint has none; a missing key reads as None."""
    iter: int = 0
    train_config: TrainConfig | None = None
    best_val_loss: float | None = None     # None: no evaluation yet
    val_loss: float | None = None
    train_loss: float | None = None
    data: DataInfo | None = None
    rng: dict | None = None                # {"batch": state, "dropout": state}
    fine_tuned_from: str | None = None     # the checkpoint a fine-tune started from
    ranks: int | None = None               # MPI ranks that trained it (None: one process)
    optimizer_step: int | None = None      # written from the optimizer itself
    num_params: int | None = None          # written from the model itself
    schedule: ScheduleState | None = None  # target, time used, plateau counters (schedule.py)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """The JSON-able form, without the fields that are None."""
        out = {k: _jsonable(getattr(self, k)) for k in _META_FIELDS}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, info: dict) -> "CheckpointMeta":
        """The metadata of a file, every field checked for its type and range: a forged or
        damaged file (with a recomputed checksum) is a UserError, never a crash later."""
        meta = cls(**{k: info[k] for k in _META_FIELDS if info.get(k) is not None})
        for name in ("iter", "optimizer_step", "num_params", "format_version"):
            _check_count(name, getattr(meta, name))
        for name in ("best_val_loss", "val_loss", "train_loss"):
            v = getattr(meta, name)
            if v is not None and not (_is_number(v) and math.isfinite(v) and v >= 0):
                raise UserError(f"metadata field {name} is {v!r}, not a loss (a number >= 0)")
        if meta.fine_tuned_from is not None and not isinstance(meta.fine_tuned_from, str):
            raise UserError(f"metadata field fine_tuned_from is {meta.fine_tuned_from!r}, "
                            "not a path")
        tc, data = meta.train_config, meta.data
        if tc is not None:
            if not isinstance(tc, dict):
                raise UserError(f"metadata field train_config is {tc!r}, not an object")
            tc = TrainConfig.from_dict(tc)
            check_config_types(tc, "train_config")
            try:
                tc.validate()
            except UserError as e:
                raise UserError(f"metadata train_config: {e}") from None
        if data is not None:
            if not isinstance(data, dict):
                raise UserError(f"metadata field data is {data!r}, not an object")
            data = DataInfo(**{k: v for k, v in data.items() if k in _DATA_FIELDS})
            for k in ("path", "sha256", "doc_separator"):
                if getattr(data, k) is not None and not isinstance(getattr(data, k), str):
                    raise UserError(f"metadata field data.{k} is {getattr(data, k)!r}, "
                                    "not a string")
            for k in ("documents", "train_tokens", "val_tokens"):
                _check_count(f"data.{k}", getattr(data, k))
            if data.val_split not in (None, "random", "tail"):
                raise UserError(f"metadata field data.val_split is {data.val_split!r}, not "
                                "'random' or 'tail'")
        if meta.rng is not None:
            if not isinstance(meta.rng, dict) or not set(meta.rng) <= {"batch", "dropout"}:
                raise UserError("metadata field rng is malformed (it holds the batch and "
                                "dropout generator states)")
            for k, state in meta.rng.items():
                try:
                    rng_from_state(state)
                except UserError:
                    raise
                except Exception as e:      # numpy's setter raises several types
                    raise UserError(f"metadata field rng.{k} is not a valid generator state "
                                    f"({type(e).__name__})") from None
        schedule = meta.schedule
        if schedule is not None and not isinstance(schedule, ScheduleState):
            schedule = ScheduleState.from_json(schedule)
        return replace(meta, train_config=tc, data=data, schedule=schedule)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_count(name: str, v) -> None:
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise UserError(f"metadata field {name} is {v!r}, not a whole number >= 0")


def check_config_types(cfg, where: str) -> None:
    """Each field of a config read from a file has its declared type (JSON could hold any)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        ok = {"int": isinstance(v, int) and not isinstance(v, bool),
              "float": _is_number(v) and math.isfinite(v),
              "bool": isinstance(v, bool), "str": isinstance(v, str)}.get(f.type, True)
        if not ok:
            raise UserError(f"metadata field {where}.{f.name} is {v!r}, not a finite {f.type}")


_DATA_FIELDS = tuple(DataInfo.__dataclass_fields__)
_META_FIELDS = tuple(CheckpointMeta.__dataclass_fields__)


@dataclass
class Checkpoint:
    path: str
    model: GPT                       # weights loaded, float32
    tokenizer: object
    model_config: ModelConfig
    meta: CheckpointMeta
    optimizer_state: dict | None     # {'m': flat ndarray, 'v': flat ndarray, 'step': int}

    @property
    def iter(self) -> int:
        return self.meta.iter

    @property
    def train_config(self) -> TrainConfig | None:
        return self.meta.train_config

    @property
    def resumable(self) -> bool:
        """Whether it holds the whole training state (optimizer, configs, RNG streams)."""
        return (self.optimizer_state is not None and self.train_config is not None
                and self.meta.rng is not None and set(self.meta.rng) == {"batch", "dropout"})


# ---------------------------------------------------------------------------------------------
# writing

def encode_checkpoint(model: GPT, tokenizer, optimizer=None,
                      meta: CheckpointMeta | None = None) -> bytes:
    """The bytes of a checkpoint file. Refuses non-finite weights: a diverged run must not
    replace a good checkpoint."""
    to_host = model.backend.to_host          # a GPU model's buffers are copied out once
    flat = to_host(model.params.flat)
    if not np.isfinite(flat).all():
        raise UserError("refusing to write a checkpoint: the weights contain NaN or inf "
                        "(training diverged); the previous checkpoint is kept")
    tensors = {name: np.ascontiguousarray(flat[a:b].reshape(model.params[name].shape),
                                          dtype=np.float32)
               for name, (a, b) in model.params.offsets.items()}
    meta = replace(meta or CheckpointMeta(), format_version=FORMAT_VERSION,
                   num_params=int(model.num_params), optimizer_step=None)
    if optimizer is not None:
        for prefix, buf in zip(_MOMENTS, (to_host(optimizer.m), to_host(optimizer.v))):
            for name, (a, b) in model.params.offsets.items():
                tensors[prefix + name] = np.ascontiguousarray(
                    buf[a:b].reshape(model.params[name].shape), dtype=np.float32)
        meta.optimizer_step = int(optimizer.step_count)
    info = dict(meta.to_json(), model_config=model.cfg.to_dict(), tokenizer=tokenizer.to_dict())
    info_json = json.dumps(info, sort_keys=True, allow_nan=False)
    digests = {"sha256": _digest(info_json, tensors)}
    if optimizer is not None:
        weights = {k: t for k, t in tensors.items() if not k.startswith(_MOMENTS)}
        digests["sha256_weights"] = _digest(info_json, weights)
    from safetensors.numpy import save
    return save(tensors, metadata={"format": FORMAT_NAME, "randygpt": info_json, **digests})


def save_checkpoint(path, model: GPT, tokenizer, optimizer=None,
                    meta: CheckpointMeta | None = None) -> None:
    write_atomic(path, encode_checkpoint(model, tokenizer, optimizer, meta))


def write_atomic(path, data: bytes) -> None:
    """Write data to path so that path holds either its old bytes or all the new ones."""
    path = os.fspath(path)
    import secrets
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-"
                                  f"{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):     # disk full, quota, I/O error: the old file is intact
            raise UserError(f"cannot write {path}: {e.strerror or e}; its previous version, "
                            "if any, is intact") from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


def remove_stale_temp_files(directory) -> list[str]:
    """Delete temp files that a killed writer left in directory (those of live processes stay)."""
    removed = []
    for name in os.listdir(directory):
        m = _TEMP_NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False           # our own writes clean up after themselves; a leftover is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# reading

def load_checkpoint(path, optimizer: bool = True) -> Checkpoint:
    """Read and validate a checkpoint; any problem is a UserError naming the file and the fault.
    A directory means the checkpoint.safetensors inside it. optimizer=False: the weights,
    tokenizer and metadata only (generate, eval, serve); the AdamW moments, two thirds of a
    training checkpoint, are then not read and optimizer_state is None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, LATEST)):
            raise UserError(f"directory {path!r} holds no {LATEST}; pass a checkpoint file")
        path = os.path.join(path, LATEST)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path!r} does not exist")

    def bad(what):
        return UserError(f"checkpoint {path!r} {what}")

    try:
        with open(path, "rb") as f:
            header, data_start = read_safetensors_header(f, os.fstat(f.fileno()).st_size, bad)
            info = _read_info(header, bad)
            try:
                from safetensors import safe_open
                safe_open(path, framework="numpy")     # checks the layout; reads no tensor
            except Exception as e:   # safetensors raises its own error type for every fault
                raise bad(f"is corrupted ({str(e).splitlines()[0]})") from None
            try:
                return _assemble(path, f, header, data_start, info, optimizer, bad)
            except UserError as e:
                if path in str(e):
                    raise
                raise bad(f"is invalid: {e}") from None
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise bad(f"has malformed metadata ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise UserError(f"checkpoint {path!r} cannot be read: {e.strerror or e}") from None


def read_safetensors_header(f, size: int, bad,
                            kind: str = "randyGPT checkpoint") -> tuple[dict, int]:
    """The safetensors JSON header of the open file f of `size` bytes, and where the tensor
    data begins; every way a file can fail to be a safetensors file is named. `bad(what)`
    makes the error (it names the file); `kind` is what the file should have been. Both
    checkpoints and imported Hugging Face weights (hf.py) are read through here."""
    start = f.read(9)
    if size == 0:
        raise bad(f"is empty (0 bytes); use another {kind}")
    if start[:4] == b"PK\x03\x04":
        raise bad(f"is a zip archive (a PyTorch .pt file?), not a safetensors {kind}")
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise bad(f"is a Python pickle, not a {kind}; "
                  "randyGPT never loads pickles (they can run code)")
    if size < 8:
        raise bad(f"is only {size} bytes long: it is truncated or not a {kind}")
    (n,) = struct.unpack("<Q", start[:8])
    if not start[8:9] == b"{" or n > _MAX_HEADER:
        raise bad(f"is not a safetensors file (no valid header): it is corrupted or not a "
                  f"{kind}")
    if 8 + n > size:
        raise bad(f"is truncated ({size} bytes; its header alone needs {8 + n})")
    try:
        header = json.loads(start[8:] + f.read(n - 1))
    except (UnicodeDecodeError, ValueError):
        raise bad("is corrupted: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("is corrupted: its safetensors header is not a JSON object")
    try:   # where the last tensor ends; a malformed entry is left to safetensors to name
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        end = 0
    if 8 + n + end > size:
        raise bad(f"is truncated ({size} bytes; it should have {8 + n + end})")
    return header, 8 + n


def _read_info(header: dict, bad) -> dict:
    meta = header.get("__metadata__")
    ours = ("format", "randygpt", "sha256")
    if not isinstance(meta, dict) or not any(k in meta for k in ours):
        raise bad("is a safetensors file but not a randyGPT checkpoint (no randygpt metadata)")
    # exactly our keys (a damaged name must not hide the optional sha256_weights), all strings
    if (meta.get("format") != FORMAT_NAME or not set(ours) <= set(meta) <= {*ours, "sha256_weights"}
            or not all(isinstance(v, str) for v in meta.values())):
        raise bad("is corrupted: its randygpt metadata is damaged")
    try:
        info = json.loads(meta["randygpt"])
    except ValueError:
        raise bad("is corrupted: its randygpt metadata is not valid JSON") from None
    version = info.get("format_version") if isinstance(info, dict) else None
    if not isinstance(version, int) or version < 1:
        raise bad(f"has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise bad(f"was written in checkpoint format version {version}, newer than this "
                  f"randyGPT reads (up to {FORMAT_VERSION}): upgrade randygpt to load it")
    return info


def _assemble(path, f, header, data_start, info, optimizer, bad) -> Checkpoint:
    """The Checkpoint of a file whose header and metadata are read: each tensor is read
    straight from f into its place (the model's buffer, the moments' buffers), then checked."""
    if not isinstance(info.get("model_config"), dict):
        raise bad("has no model configuration in its metadata")
    mcfg = ModelConfig.from_dict(info["model_config"])
    check_config_types(mcfg, "model_config")
    mcfg.validate()
    tokenizer = tokenizer_from_dict(info["tokenizer"])
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise bad(f"is inconsistent: its tokenizer has {tokenizer.vocab_size} tokens but its "
                  f"model config says vocab_size {mcfg.vocab_size}")
    expected = dict(parameter_shapes(mcfg))
    names = [k for k in header if k != "__metadata__"]
    has_moments = any(k.startswith(_MOMENTS) for k in names)
    wanted = set(expected) | ({p + n for p in _MOMENTS for n in expected} if has_moments else set())
    missing, extra = sorted(wanted - set(names)), sorted(set(names) - wanted)
    if missing:
        raise bad(f"lacks tensor(s) {', '.join(missing[:5])}")
    if extra:
        raise bad(f"has unexpected tensor(s) {', '.join(extra[:5])} for its model config")
    for name in sorted(wanted):
        entry = header[name]
        shape = expected[name.split(".", 2)[2] if name.startswith(_MOMENTS) else name]
        if tuple(entry["shape"]) != shape:
            raise bad(f"has tensor {name} of shape {tuple(entry['shape'])}, but its model "
                      f"config needs {shape}")
        if entry["dtype"] != "F32":
            raise bad(f"has tensor {name} of dtype {_DTYPES.get(entry['dtype'], entry['dtype'])}"
                      "; randyGPT checkpoints are float32")

    model = GPT(mcfg, seed=None)
    weights = {name: model.params[name] for name in expected}
    tensors = dict(weights)
    # the moments are read where they are wanted, or where the only digest covers them
    stored = header["__metadata__"]
    moments = None
    if has_moments and (optimizer or "sha256_weights" not in stored):
        moments = [FlatTensors(model.params.shapes, np.float32) for _ in _MOMENTS]
        tensors.update({p + n: buf[n] for p, buf in zip(_MOMENTS, moments) for n in expected})
    for name, t in tensors.items():
        f.seek(data_start + header[name]["data_offsets"][0])
        if f.readinto(memoryview(t).cast("B")) != t.nbytes:
            raise bad("is truncated (it changed while it was read?)")
    # each digest whose bytes were all read is checked: a full load checks both of a
    # training checkpoint's, so every byte of the file is covered
    covers = {"sha256_weights": weights}
    if moments is not None or not has_moments:
        covers["sha256"] = tensors
    for key, covered in covers.items():
        if key in stored and _digest(stored["randygpt"], covered) != stored[key]:
            raise bad("is corrupted: its contents do not match the checksum stored in it "
                      "(the file was damaged after it was written)")
    if not optimizer:
        moments = None                  # an older file's were read for its digest only
    for name, t in sorted((weights if moments is None else tensors).items()):
        if not np.isfinite(t).all():
            raise bad(f"has NaN or inf values in tensor {name} (the run that wrote it "
                      "diverged); use an earlier checkpoint")
    meta = CheckpointMeta.from_json(info)
    opt_state = None
    if moments is not None:
        opt_state = {"m": moments[0].flat, "v": moments[1].flat,
                     "step": int(meta.optimizer_step or 0)}
    return Checkpoint(path, model, tokenizer, mcfg, meta, opt_state)


def _digest(info_json: str, tensors: dict) -> str:
    h = hashlib.sha256(b"randygpt-checkpoint\0" + info_json.encode("utf-8"))
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{t.dtype.str}\0{t.shape}\0".encode())
        h.update(memoryview(t).cast("B"))
    return h.hexdigest()


def _jsonable(v):
    """Metadata values as JSON: dataclasses as dicts, NaN/inf floats as None."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.integer, np.floating)):
        return _jsonable(v.item())
    return v


# ---------------------------------------------------------------------------------------------
# training state: RNG streams and the optimizer

def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state      # a JSON-able dict (big ints are fine in JSON)


def rng_from_state(state: dict) -> np.random.Generator:
    kind = _RNG_KINDS.get(state.get("bit_generator"))
    if kind is None:
        raise UserError(f"unsupported random generator {state.get('bit_generator')!r} "
                        f"(expected one of {', '.join(_RNG_KINDS)})")
    bit_gen = kind()
    bit_gen.state = state
    return np.random.Generator(bit_gen)


def restore_optimizer(opt, state: dict) -> None:
    xp = array_module(opt.m)                 # the moments may live on a GPU
    opt.m[...] = xp.asarray(state["m"])
    opt.v[...] = xp.asarray(state["v"])
    opt.step_count = int(state["step"])


# ---------------------------------------------------------------------------------------------
# finding and describing checkpoints

def find_checkpoint(checkpoint=None, run=None, runs_dir="runs") -> str:
    """`checkpoint` as given; `run`'s best (else latest) checkpoint; else the best checkpoint
    of the most recently modified run directory under runs_dir that has one."""
    if checkpoint is not None:
        return checkpoint
    if run is not None:
        for name in (BEST, LATEST):
            if os.path.isfile(os.path.join(run, name)):
                return os.path.join(run, name)
        raise UserError(f"run directory {run!r} has no {BEST} or {LATEST}; "
                        "pass {field} PATH or a run that has been trained", "checkpoint")
    runs = []
    if os.path.isdir(runs_dir):
        runs = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)
                if os.path.isfile(os.path.join(runs_dir, d, BEST))]
    if not runs:
        raise UserError(f"no checkpoint given and no run under ./{runs_dir} has a {BEST}; "
                        "train one with 'randygpt train' or pass {field} PATH", "checkpoint")
    return os.path.join(max(runs, key=os.path.getmtime), BEST)


def summary(ckpt: Checkpoint) -> dict:
    """What `randygpt info` shows, as one JSON-able dict."""
    meta = ckpt.meta
    # the best val loss is only news where its checkpoint exists (a failed write, a copied file)
    best = os.path.join(os.path.dirname(os.path.abspath(ckpt.path)), BEST)
    has_best = os.path.isfile(best)
    return {
        "path": ckpt.path,
        "file_size": os.path.getsize(ckpt.path),
        "format_version": meta.format_version,
        "model_config": ckpt.model_config.to_dict(),
        "num_params": int(ckpt.model.num_params),
        "iter": ckpt.iter,
        "optimizer_step": meta.optimizer_step,
        "best_val_loss": meta.best_val_loss if has_best else None,
        "best_checkpoint": best if has_best else None,
        "val_loss": meta.val_loss,
        "tokenizer": {"kind": ckpt.tokenizer.to_dict().get("kind"),
                      "vocab_size": int(ckpt.tokenizer.vocab_size)},
        "train_config": ckpt.train_config.to_dict() if ckpt.train_config else None,
        "has_optimizer_state": ckpt.optimizer_state is not None,
        "schedule": meta.schedule.to_json() if meta.schedule is not None else None,
    }
