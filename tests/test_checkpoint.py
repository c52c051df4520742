"""Checkpoint files: a faithful round trip, atomic writes, and a clear error for every bad file."""
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from randygpt import checkpoint as ck
from randygpt.checkpoint import FORMAT_VERSION, CheckpointMeta, load_checkpoint, save_checkpoint
from randygpt.cli import main
from randygpt.config import ModelConfig, TrainConfig
from randygpt.errors import UserError
from randygpt.model import GPT, count_parameters
from randygpt.optim import AdamW
from randygpt.tokenizer import CharTokenizer
from randygpt.runs import plan_run
from randygpt.train import train

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def tiny_configs(**kw):
    m = ModelConfig(block_size=16, n_layer=1, n_embd=16, n_head=2, dropout=0.1)
    t = TrainConfig(iters=12, batch_size=4, warmup=3, eval_interval=6, eval_iters=2, seed=5)
    for k, v in kw.items():
        setattr(m if hasattr(m, k) else t, k, v)
    return m, t


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A run directory holding a real checkpoint from 12 training iterations."""
    out = tmp_path_factory.mktemp("run")
    train(plan_run(*tiny_configs(), text=TEXT, out_dir=str(out)), sample_tokens=0,
          log=lambda *_: None)
    return out


@pytest.fixture
def run_dir(good_run, tmp_path):
    """A private copy of the good run (tests may damage files in it)."""
    d = tmp_path / "run"
    d.mkdir()
    for name in os.listdir(good_run):
        (d / name).write_bytes((good_run / name).read_bytes())
    return d


def reencode(src, edit_info=None, edit_tensors=None) -> bytes:
    """The checkpoint at src, edited, with a valid checksum: fabricates well-formed files that
    are wrong in one specific way (version, shapes, dtype)."""
    raw = open(src, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    info, tensors = json.loads(meta["randygpt"]), st_load(raw)
    if edit_info:
        edit_info(info)
    if edit_tensors:
        edit_tensors(tensors)
    info_json = json.dumps(info, sort_keys=True)
    return st_save(tensors, metadata={"format": "randygpt", "randygpt": info_json,
                                      "sha256": ck._digest(info_json, tensors)})


# ---------------------------------------------------------------------------------------------
# round trip

def test_save_load_round_trip_is_exact(tmp_path):
    mcfg = ModelConfig(vocab_size=0, block_size=8, n_layer=2, n_embd=16, n_head=4)
    tok = CharTokenizer.from_text("abc def\n")
    mcfg.vocab_size = tok.vocab_size
    model = GPT(mcfg, seed=3)
    opt = AdamW(model.params.flat, model.decay_mask())
    rng = np.random.default_rng(7)
    for _ in range(3):
        opt.step(rng.standard_normal(model.num_params).astype(np.float32), 1e-2)
    draws = np.random.default_rng(11)
    draws.random(5)
    tcfg = TrainConfig(iters=77, lr=2e-3)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, tok, opt, CheckpointMeta(
        iter=3, train_config=tcfg, best_val_loss=1.5, rng={"batch": ck.rng_state(draws)}))
    c = load_checkpoint(str(path))
    np.testing.assert_array_equal(c.model.params.flat, model.params.flat)
    assert c.model.params.flat.dtype == np.float32
    np.testing.assert_array_equal(c.optimizer_state["m"], opt.m)
    np.testing.assert_array_equal(c.optimizer_state["v"], opt.v)
    assert c.optimizer_state["step"] == 3 and c.iter == 3 and c.meta.best_val_loss == 1.5
    assert c.model_config == mcfg and c.train_config == tcfg
    assert c.tokenizer.to_dict() == tok.to_dict()
    assert c.meta.format_version == FORMAT_VERSION
    # the restored generator continues the very same stream
    restored = ck.rng_from_state(c.meta.rng["batch"])
    np.testing.assert_array_equal(restored.random(4), draws.random(4))
    # no temp file is left behind, and the weights-only form has no optimizer state
    save_checkpoint(tmp_path / "w.safetensors", model, tok)
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "w.safetensors"]
    assert load_checkpoint(tmp_path / "w.safetensors").optimizer_state is None


def test_tensors_are_readable_by_plain_safetensors(run_dir):
    tensors = st_load((run_dir / "checkpoint.safetensors").read_bytes())
    c = load_checkpoint(run_dir)            # a directory means its checkpoint.safetensors
    np.testing.assert_array_equal(tensors["h.0.attn.qkv"], c.model.params["h.0.attn.qkv"])
    assert "adam.m.wte" in tensors and "adam.v.lm_head" in tensors


def _data_offset(raw: bytes, name: str) -> int:
    """Where tensor `name`'s bytes begin in a safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_without_the_optimizer_only_the_weights_are_read_and_checked(run_dir):
    """load_checkpoint(optimizer=False), as generate, eval and serve load: the same model,
    tokenizer and metadata, no moments. A training checkpoint's sha256_weights covers all
    but the moments, so a damaged moment goes unnoticed there (nothing uses it), and the
    full load still refuses it; a damaged weight is refused by both."""
    path = run_dir / "checkpoint.safetensors"
    full, light = load_checkpoint(path), load_checkpoint(path, optimizer=False)
    assert full.resumable and light.optimizer_state is None and not light.resumable
    np.testing.assert_array_equal(light.model.params.flat, full.model.params.flat)
    assert light.meta == full.meta and light.model_config == full.model_config
    assert light.tokenizer.to_dict() == full.tokenizer.to_dict()

    raw, bad = path.read_bytes(), run_dir / "bad.safetensors"
    bad.write_bytes(_flip(raw, _data_offset(raw, "adam.v.wte") + 5))
    with pytest.raises(UserError, match="do not match the checksum"):
        load_checkpoint(bad)
    np.testing.assert_array_equal(load_checkpoint(bad, optimizer=False).model.params.flat,
                                  full.model.params.flat)
    bad.write_bytes(_flip(raw, _data_offset(raw, "h.0.mlp.fc") + 5))
    for optimizer in (True, False):
        with pytest.raises(UserError, match="do not match the checksum"):
            load_checkpoint(bad, optimizer=optimizer)


def test_damage_to_either_digest_is_refused(run_dir):
    """A flipped byte in a digest's name or value: the full load checks both digests (every
    byte of the file stays covered); without the optimizer, sha256_weights is checked."""
    raw, bad = (run_dir / "checkpoint.safetensors").read_bytes(), run_dir / "bad.safetensors"
    for key in ("sha256_weights", "sha256"):
        at = raw.index(f'"{key}":"'.encode())
        for where in (at + 3, at + len(key) + 6):                  # in its name, its value
            bad.write_bytes(_flip(raw, where))
            for optimizer in (True, False) if key == "sha256_weights" else (True,):
                with pytest.raises(UserError, match="corrupted"):
                    load_checkpoint(bad, optimizer=optimizer)


def test_a_file_without_the_weights_digest_is_checked_whole(run_dir):
    """A checkpoint written before sha256_weights existed has the full digest only: without
    the optimizer, its moments are read to check it, so a damaged moment is refused too."""
    older = run_dir / "older.safetensors"
    older.write_bytes(reencode(run_dir / "checkpoint.safetensors"))     # sha256 alone
    raw = older.read_bytes()
    assert b"sha256_weights" not in raw
    good = load_checkpoint(older, optimizer=False)
    assert good.optimizer_state is None
    np.testing.assert_array_equal(good.model.params.flat, load_checkpoint(older).model.params.flat)
    older.write_bytes(_flip(raw, _data_offset(raw, "adam.m.lm_head") + 5))
    with pytest.raises(UserError, match="do not match the checksum"):
        load_checkpoint(older, optimizer=False)


def test_refuses_to_write_nan_weights(tmp_path):
    model = GPT(ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_embd=8, n_head=2), seed=0)
    tok = CharTokenizer("abc")
    save_checkpoint(tmp_path / "c.safetensors", model, tok)
    before = (tmp_path / "c.safetensors").read_bytes()
    model.params["wte"][1, 2] = np.nan
    with pytest.raises(UserError, match="NaN"):
        save_checkpoint(tmp_path / "c.safetensors", model, tok)
    assert (tmp_path / "c.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail):
    target = tmp_path / "c.safetensors"
    ck.write_atomic(target, b"old contents")

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, fail, boom)
    with pytest.raises(UserError, match="cannot write .*c.safetensors: No space left on device"):
        ck.write_atomic(target, b"new contents that never land")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".checkpoint.safetensors.tmp-{dead.pid}-0badc0de"
        live = tmp_path / f".checkpoint.safetensors.tmp-{alive.pid}-12345678"
        other = tmp_path / "notes.tmp-1-abc"
        for p in (stale, live, other):
            p.write_bytes(b"partial")
        assert ck.remove_stale_temp_files(tmp_path) == [stale.name]
        assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
    finally:
        alive.kill()
        alive.wait()


def test_unknown_rng_kind_is_refused_not_looked_up():
    with pytest.raises(UserError, match="unsupported random generator"):
        ck.rng_from_state({"bit_generator": "os.system", "state": {}})


# ---------------------------------------------------------------------------------------------
# bad files: each gives one clear line naming the file, and harms nothing

def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:          # the layout of a PyTorch .pt file
        z.writestr("archive/data.pkl", pickle.dumps({"wte": [0.0] * 8}))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]


def _edit_iter(data: bytes) -> bytes:
    """Change the iteration stored in the metadata: still valid JSON, same length."""
    old, new = b'\\"iter\\": 12,', b'\\"iter\\": 19,'
    assert data.count(old) == 1
    return data.replace(old, new)


def _set(key, value):
    def edit(info):
        info[key] = value
    return edit


def _edit(key, change):
    def edit(info):
        change(info[key])
    return edit


def _nan(name, value=np.nan):
    def edit(tensors):
        t = tensors[name].copy()
        t.flat[3] = value
        tensors[name] = t
    return edit


def _wrong_shape(tensors):
    tensors["h.0.mlp.fc"] = np.zeros((16, 48), np.float32)


def _wrong_dtype(tensors):
    tensors["wte"] = tensors["wte"].astype(np.float64)


BAD_FILES = {
    # name: (make bytes from the good checkpoint's bytes and path, fragment of the message)
    "empty": (lambda good, p: b"", "is empty"),
    "truncated-half": (lambda good, p: good[:len(good) // 2], "truncated"),
    "truncated-last-byte": (lambda good, p: good[:-1], "truncated"),
    "truncated-in-header": (lambda good, p: good[:200], "truncated"),
    "tiny": (lambda good, p: good[:5], "truncated or not a randyGPT checkpoint"),
    "flipped-tensor-byte": (lambda good, p: _flip(good, len(good) - 100), "corrupted"),
    "edited-metadata": (lambda good, p: _edit_iter(good), "do not match the checksum"),
    "flipped-header-byte": (lambda good, p: _flip(good, 30), "corrupted"),
    "random-bytes": (lambda good, p: np.random.default_rng(0).bytes(4000), "not a safetensors"),
    "text-file": (lambda good, p: b"hello, this is not a checkpoint\n", "not a safetensors"),
    "pickle": (lambda good, p: pickle.dumps({"state_dict": {"wte": [1.0, 2.0]}}, protocol=4),
               "pickle"),
    "pytorch-zip": (lambda good, p: _zip_bytes(), "zip archive"),
    "foreign-safetensors": (lambda good, p: st_save({"weight": np.zeros(3, np.float32)}),
                            "not a randyGPT checkpoint"),
    "newer-version": (lambda good, p: reencode(p, edit_info=_set("format_version",
                                                                 FORMAT_VERSION + 1)),
                      "newer than this randyGPT reads"),
    "wrong-shape": (lambda good, p: reencode(p, edit_tensors=_wrong_shape),
                    "h.0.mlp.fc of shape (16, 48), but its model config needs (16, 64)"),
    "wrong-dtype": (lambda good, p: reencode(p, edit_tensors=_wrong_dtype), "dtype float64"),
    "missing-tensor": (lambda good, p: reencode(p, edit_tensors=lambda t: t.pop("lm_head")),
                       "lacks tensor(s) lm_head"),
    "bad-tokenizer": (lambda good, p: reencode(p, edit_info=_set("tokenizer", {"kind": "xyz"})),
                      "unknown tokenizer kind"),
    # forged metadata with a recomputed checksum: each field's type and range is checked
    "forged-rng-state": (lambda good, p: reencode(p, edit_info=_edit(
        "rng", lambda r: r["batch"].update(state={"state": "x"}))), "rng.batch is not a valid"),
    "forged-rng-keys": (lambda good, p: reencode(p, edit_info=_set("rng", {"os": 1})),
                        "rng is malformed"),
    "forged-rng-value": (lambda good, p: reencode(p, edit_info=_set("rng", {"batch": 1})),
                         "rng.batch is not a valid"),
    "forged-negative-lr": (lambda good, p: reencode(p, edit_info=_edit(
        "train_config", lambda t: t.update(lr=-0.5))), "lr -0.5 must be > 0"),
    "forged-string-batch": (lambda good, p: reencode(p, edit_info=_edit(
        "train_config", lambda t: t.update(batch_size="4"))), "batch_size is '4', not a finite int"),
    "forged-negative-iter": (lambda good, p: reencode(p, edit_info=_set("iter", -3)),
                             "iter is -3, not a whole number"),
    "forged-float-layers": (lambda good, p: reencode(p, edit_info=_edit(
        "model_config", lambda m: m.update(n_layer=1.5))), "n_layer is 1.5"),
    "forged-loss": (lambda good, p: reencode(p, edit_info=_set("best_val_loss", "low")),
                    "best_val_loss is 'low'"),
    "forged-data": (lambda good, p: reencode(p, edit_info=_edit(
        "data", lambda d: d.update(documents=-1))), "data.documents is -1"),
    "nan-weights": (lambda good, p: reencode(p, edit_tensors=_nan("wte")), "NaN or inf"),
    "inf-moment": (lambda good, p: reencode(p, edit_tensors=_nan("adam.v.lm_head", np.inf)),
                   "NaN or inf values in tensor adam.v.lm_head"),
}


def _snapshot(d):
    return {n: ((d / n).read_bytes(), os.stat(d / n).st_mtime_ns) for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_clear_error_and_harms_nothing(run_dir, case, capsys):
    good_path = run_dir / "checkpoint.safetensors"
    make, fragment = BAD_FILES[case]
    bad = run_dir / "bad.safetensors"
    bad.write_bytes(make(good_path.read_bytes(), good_path))
    before = _snapshot(run_dir)

    with pytest.raises(UserError) as e:
        load_checkpoint(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and fragment in msg and "\n" not in msg, msg

    commands = [["info", str(bad)], ["info", str(bad), "--json"],
                ["train", "--resume", str(bad), "--iters", "30", "--no-progress"]]
    if case != "inf-moment":          # generate reads no moment (the test above)
        commands.append(["generate", "--checkpoint", str(bad), "--max-tokens", "3"])
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and fragment in err[0], err
    assert _snapshot(run_dir) == before         # the good checkpoint and everything else intact
    assert load_checkpoint(good_path).iter == 12


@pytest.mark.parametrize("case", ["truncated-half", "pickle"])
def test_bad_file_from_the_real_command_line(run_dir, case):
    good_path = run_dir / "checkpoint.safetensors"
    bad = run_dir / "bad.safetensors"
    bad.write_bytes(BAD_FILES[case][0](good_path.read_bytes(), good_path))
    before = _snapshot(run_dir)
    for args in (["info", str(bad)], ["train", "--resume", str(bad), "--iters", "30"]):
        r = subprocess.run([sys.executable, "-m", "randygpt", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr
    assert _snapshot(run_dir) == before


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="holds no checkpoint.safetensors"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# randygpt info

def test_info_prints_config_size_iteration_loss_and_tokenizer(run_dir, capsys):
    path = run_dir / "checkpoint.safetensors"
    c = load_checkpoint(path)
    assert main(["info", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["file_size"] == os.path.getsize(path)
    assert s["num_params"] == count_parameters(c.model_config) == c.model.num_params
    assert s["model_config"] == dict(ModelConfig().to_dict(), vocab_size=c.tokenizer.vocab_size,
                                     block_size=16, n_layer=1, n_embd=16, n_head=2, dropout=0.1)
    assert s["iter"] == 12 and s["optimizer_step"] == 12
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert s["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows), abs=1e-6)
    assert s["tokenizer"] == {"kind": "char", "vocab_size": len(set(TEXT)) + 2}

    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    for fragment in (f"{s['file_size']:,} bytes", "1 layers, 16 dim, 2 heads, block 16",
                     f"{s['num_params']:,} parameters", "iteration: 12 of 12",
                     f"best val loss: {s['best_val_loss']:.4f}",
                     f"tokenizer: char, {s['tokenizer']['vocab_size']} tokens"):
        assert fragment in text, (fragment, text)


def test_generate_refuses_nan_weights_in_one_line(run_dir, capsys):
    good_path = run_dir / "checkpoint.safetensors"
    bad = run_dir / "nan.safetensors"
    bad.write_bytes(reencode(good_path, edit_tensors=_nan("lm_head")))
    assert main(["generate", "--checkpoint", str(bad), "--max-tokens", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN or inf" in err[0]
