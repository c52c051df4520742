"""GPT-2 import and export (randygpt/hf.py): against a committed tiny GPT-2 directory (no
transformers needed), and against transformers itself on small random GPT2LMHeadModels built
here (skipped without it): logits, greedy generation, gradients, round trips."""
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import load_file

from randygpt import cli
from randygpt.checkpoint import load_checkpoint
from randygpt.errors import UserError
from randygpt.hf import export_hf, hf_name, import_hf, load_hf, read_safetensors
from randygpt.model import KVCache
from randygpt.tokenizer import GPT2Tokenizer, tokenizer_from_dict
from hf_tools import TEXT

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")


def expected():
    e = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    return e["ids"], e["logits"]


# --------------------------------------------------------------------------------------------
# the committed fixture: transformers' float64 logits, recorded by tests/fixtures/make_tiny_gpt2.py

@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_fixture_logits_match_transformers(backend):
    ids, want = expected()
    m64, tok = load_hf(FIXTURE, dtype=np.float64, backend=backend)
    assert m64.cfg.tied_head and m64.cfg.norm == "layernorm" and tok.kind == "gpt2"
    assert tok.bos_id == tok.eos_id == 0
    np.testing.assert_allclose(m64.forward(ids[None])[0][0], want, rtol=0, atol=1e-10)
    m32, _ = load_hf(FIXTURE, backend=backend)
    np.testing.assert_allclose(m32.forward(ids[None])[0][0], want, rtol=0, atol=1e-5)
    # the KV-cache path gives the same logits as the full forward
    cache = KVCache(m32.cfg)
    first = m32.prefill(ids[:10], cache)
    steps = [m32.decode(np.array([t]), cache, [0])[0] for t in ids[10:]]
    np.testing.assert_allclose(np.vstack([first, *steps]), want, rtol=0, atol=1e-5)


def test_fixture_tokenizer_from_vocab_and_merges():
    ids, _ = expected()
    _, tok = load_hf(FIXTURE)
    np.testing.assert_array_equal(tok.encode(TEXT[:120])[:32], ids)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("<|endoftext|>").tolist() != [tok.eos_id]     # plain text in a document
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(again, GPT2Tokenizer) and again.bos_id == tok.bos_id
    from randygpt.tokenizer import BPETokenizer
    with pytest.raises(UserError, match="no <\\|endoftext\\|> token"):   # randyGPT's own BPE
        GPT2Tokenizer(BPETokenizer.train(TEXT, 300).hf_json)


def test_import_writes_an_ordinary_checkpoint_that_generate_eval_and_fine_tune_accept(
        tmp_path, capsys):
    out = str(tmp_path / "tiny.safetensors")
    assert cli.main(["import-hf", FIXTURE, out]) == 0
    assert "300 tokens" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    m, _ = load_hf(FIXTURE)
    np.testing.assert_array_equal(ckpt.model.params.flat, m.params.flat)
    assert cli.main(["generate", "--checkpoint", out, "--prompt", "First", "--temperature",
                     "0", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 3)
    assert cli.main(["eval", "--checkpoint", out, "--data", str(data), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["loss"]
    assert np.isfinite(before) and before > 0
    run = tmp_path / "ft"
    assert cli.main(["train", "--fine-tune", out, "--data", str(data), "--out", str(run),
                     "--iters", "6", "--batch", "4", "--block", "16", "--warmup", "0",
                     "--eval-interval", "6", "--eval-iters", "1", "--sample-tokens", "0",
                     "--no-progress"]) == 0
    tuned_path = str(run / "checkpoint.safetensors")
    tuned = load_checkpoint(tuned_path)              # a shorter context: wpe's first 16 rows
    assert tuned.model_config == replace(ckpt.model_config, block_size=16)
    assert tuned.tokenizer.kind == "gpt2" and tuned.model.params["wpe"].shape == (16, 16)
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", tuned_path, "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] < before     # it learned the text
    assert cli.main(["train", "--fine-tune", out, "--data", str(data), "--block", "64"]) == 2
    assert "--block 64 is longer than the checkpoint's 32 positions" in capsys.readouterr().err
    # a second import to the same path is refused (existing work is kept) unless --force
    assert cli.main(["import-hf", FIXTURE, out]) == 2
    assert "--force" in capsys.readouterr().err


def write_safetensors(path, tensors: dict, dtype="F32"):
    """Our own minimal safetensors writer (bf16 too, which NumPy cannot hold)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, np.float32)
        raw = (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else \
            a.astype(np.float16) if dtype == "F16" else a
        blob = raw.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_weights_without_prefix_and_with_mask_buffers(tmp_path, dtype):
    d = tmp_path / "gpt2"
    shutil.copytree(FIXTURE, d)
    src = load_file(os.path.join(FIXTURE, "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in src.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((32, 32), np.float32))[None, None]
    write_safetensors(d / "model.safetensors", renamed, dtype)
    m, _ = load_hf(str(d))
    ref, _ = load_hf(FIXTURE)
    for name in ref.params.names():
        w = ref.params[name]
        want = ((w.view(np.uint32) >> 16) << 16).view(np.float32) if dtype == "BF16" \
            else w.astype(np.float16).astype(np.float32)          # bf16: truncated
        np.testing.assert_array_equal(m.params[name], want, err_msg=name)


def test_bad_directories_get_one_clear_error(tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(FIXTURE, d)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(UserError, match="pickle.*safe_serialization=True"):
        load_hf(str(d))
    shutil.copy(os.path.join(FIXTURE, "model.safetensors"), d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, activation_function="relu")))
    with pytest.raises(UserError, match="activation_function"):
        load_hf(str(d))
    (d / "config.json").write_text(json.dumps(dict(cfg, n_embd=32)))
    with pytest.raises(UserError, match="shape"):
        load_hf(str(d))
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        load_hf(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(open(FIXTURE + "/model.safetensors", "rb").read()[:900])
    with pytest.raises(UserError, match=r"is truncated \(900 bytes; .*fetch it again"):
        load_hf(str(d))
    # the checkpoint's header checks, one reader: a pickle renamed, an empty file
    (d / "model.safetensors").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(UserError, match="a Python pickle, not a weights file"):
        load_hf(str(d))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"is empty \(0 bytes\)"):
        load_hf(str(d))
    for name in ("vocab.json", "merges.txt"):
        os.remove(d / name)
    with pytest.raises(UserError, match="no tokenizer"):
        read_tokenizer_only(d)
    with pytest.raises(UserError, match="not a directory"):
        load_hf(str(tmp_path / "missing"))


def read_tokenizer_only(d):
    from randygpt.hf import read_tokenizer
    return read_tokenizer(str(d))


def test_export_refuses_randygpt_architecture(tmp_path):
    from randygpt.checkpoint import save_checkpoint
    from randygpt.config import ModelConfig
    from randygpt.model import GPT
    _, tok = load_hf(FIXTURE)
    path = str(tmp_path / "own.safetensors")
    save_checkpoint(path, GPT(ModelConfig(vocab_size=300, block_size=8, n_layer=1, n_embd=8,
                                          n_head=2)), tok)
    with pytest.raises(UserError, match="not GPT-2's"):
        export_hf(path, str(tmp_path / "out"))


# --------------------------------------------------------------------------------------------
# against transformers itself

@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers", reason="the GPT-2 comparison needs transformers (test "
                        "extra)")
    import torch
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gpt2_dir(request, tmp_path_factory, hf):
    from hf_tools import make_gpt2_dir
    path = tmp_path_factory.mktemp("gpt2-" + request.param * "tied")
    return str(path), make_gpt2_dir(path, tied=request.param)


def hf_logits(model, ids, torch):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_logits_match_transformers_in_float32_and_float64(gpt2_dir, hf):
    path, model = gpt2_dir
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 64))
    ours32, _ = load_hf(path, backend="fused")
    assert ours32.cfg.tied_head == model.config.tie_word_embeddings
    np.testing.assert_allclose(ours32.forward(ids)[0], hf_logits(model, ids, hf), rtol=0,
                               atol=1e-5)
    ours64, _ = load_hf(path, dtype=np.float64)
    np.testing.assert_allclose(ours64.forward(ids)[0], hf_logits(model.double(), ids, hf),
                               rtol=0, atol=1e-10)
    model.float()


def test_greedy_generation_matches_transformers_for_50_tokens(gpt2_dir, hf):
    path, model = gpt2_dir
    ours, tok = load_hf(path)
    prompt = tok.encode("First Citizen: ")
    with hf.no_grad():
        theirs = model.generate(hf.from_numpy(prompt.astype(np.int64))[None], do_sample=False,
                                max_new_tokens=50, min_new_tokens=50, pad_token_id=tok.eos_id)
    cache, out = KVCache(ours.cfg), []
    logits = ours.prefill(prompt, cache)[-1]
    for _ in range(50):
        out.append(int(np.argmax(logits)))
        logits = ours.decode(np.array(out[-1:]), cache, [0])[0]
    assert out == theirs[0, len(prompt):].tolist()


def test_loss_gradients_equal_torch_autograd(gpt2_dir, hf):
    path, model = gpt2_dir
    model = model.double()
    ours, _ = load_hf(path, dtype=np.float64)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, ours.cfg.vocab_size, (2, 16)), rng.integers(0, ours.cfg.vocab_size,
                                                                         (2, 16))
    _, loss = ours.forward(x, y)
    ours.backward()
    logits = model(hf.from_numpy(x)).logits
    t_loss = hf.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            hf.from_numpy(y).reshape(-1))
    model.zero_grad()
    t_loss.backward()
    assert abs(loss - t_loss.item()) < 1e-12
    grads = {k.removeprefix("transformer."): p.grad.numpy()
             for k, p in model.named_parameters()}
    for name in ours.params.names():
        theirs = grads["lm_head.weight"].T if name == "lm_head" else grads[hf_name(name)]
        scale = np.abs(theirs).max()
        assert scale > 0, name
        assert np.abs(ours.grads[name] - theirs).max() <= 1e-10 * scale, name
    model.float()


def test_import_export_import_round_trips_and_transformers_loads_the_export(gpt2_dir, hf,
                                                                             tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    path, model = gpt2_dir
    first = str(tmp_path / "a.safetensors")
    import_hf(path, first)
    assert cli.main(["export-hf", first, str(tmp_path / "export")]) == 0
    again = str(tmp_path / "b.safetensors")
    import_hf(str(tmp_path / "export"), again)
    a, b = load_checkpoint(first), load_checkpoint(again)
    assert a.model_config == b.model_config and a.tokenizer.to_dict() == b.tokenizer.to_dict()
    np.testing.assert_array_equal(a.model.params.flat, b.model.params.flat)
    # transformers loads the export and computes what the original computed
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "export")).eval()
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 40))
    np.testing.assert_array_equal(hf_logits(loaded, ids, hf), hf_logits(model, ids, hf))
    np.testing.assert_allclose(a.model.forward(ids)[0], hf_logits(loaded, ids, hf), atol=1e-5,
                               rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert hf_tok("First Citizen: résolu\tand\n 12")["input_ids"] == \
        a.tokenizer.encode("First Citizen: résolu\tand\n 12").tolist()
    assert hf_tok.eos_token_id == a.tokenizer.eos_id
    # a second export into the non-empty folder is refused unless --force
    with pytest.raises(UserError, match="not empty"):
        export_hf(first, str(tmp_path / "export"))
    # the export's vocab.json + merges.txt give the same tokenizer as its tokenizer.json
    os.remove(tmp_path / "export" / "tokenizer.json")
    _, tok = load_hf(str(tmp_path / "export"))
    assert tok.encode(TEXT).tolist() == a.tokenizer.encode(TEXT).tolist()


def test_read_safetensors_matches_the_safetensors_library(gpt2_dir):
    path, _ = gpt2_dir
    ours = read_safetensors(os.path.join(path, "model.safetensors"))
    theirs = load_file(os.path.join(path, "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])
