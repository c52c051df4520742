"""GPT-2 from and to Hugging Face directories: `randygpt import-hf` and `randygpt export-hf`.

    import_hf(DIR, OUT.safetensors)   config.json + model.safetensors + the tokenizer
                                      -> an ordinary randyGPT checkpoint (GPT-2 variant)
    export_hf(CHECKPOINT, DIR)        the reverse, for GPT-2-variant checkpoints: a directory
                                      that transformers' GPT2LMHeadModel / AutoTokenizer load

GPT-2 is randyGPT's architecture with LayerNorm, GELU (tanh), biases and a tied head
(config.py), so importing is renaming: HF's Conv1D stores weights (in, out), our layout, and
c_attn's output is [q | k | v] with heads in consecutive slices, as our attention reads qkv.
Only the untied head (lm_head.weight, (V, C)) is transposed. The weights are read by our own
safetensors reader (below), which also converts bf16/fp16 to float32; pickled
pytorch_model.bin files are refused, never opened. Nothing is downloaded here.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .checkpoint import read_safetensors_header
from .config import ModelConfig
from .errors import UserError
from .model import GPT, parameter_shapes

GPT2_ARCH = dict(norm="layernorm", activation="gelu", bias=True)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")   # HF's names of the tanh GELU
_IGNORED = (".attn.bias", ".attn.masked_bias")                # HF's causal-mask buffers
# randyGPT name suffix -> HF name suffix, inside block i (h.{i}.)
_BLOCK = {"ln1.g": "ln_1.weight", "ln1.b": "ln_1.bias",
          "attn.qkv": "attn.c_attn.weight", "attn.qkv.b": "attn.c_attn.bias",
          "attn.proj": "attn.c_proj.weight", "attn.proj.b": "attn.c_proj.bias",
          "ln2.g": "ln_2.weight", "ln2.b": "ln_2.bias",
          "mlp.fc": "mlp.c_fc.weight", "mlp.fc.b": "mlp.c_fc.bias",
          "mlp.proj": "mlp.c_proj.weight", "mlp.proj.b": "mlp.c_proj.bias"}
_TOP = {"wte": "wte.weight", "wpe": "wpe.weight", "ln_f.g": "ln_f.weight",
        "ln_f.b": "ln_f.bias"}


def hf_name(name: str) -> str:
    """randyGPT's parameter name -> GPT2Model's (without the 'transformer.' prefix)."""
    if name in _TOP:
        return _TOP[name]
    _, i, rest = name.split(".", 2)
    return f"h.{i}.{_BLOCK[rest]}"


# --------------------------------------------------------------------------------------------
# reading a Hugging Face GPT-2 directory

def read_config(directory: str) -> ModelConfig:
    """config.json of a GPT2LMHeadModel -> ModelConfig (dropout 0: set it when fine-tuning)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{directory} has no config.json: it is not a Hugging Face model "
                        "directory (see the README's GPT-2 section for how to get one)")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fetch it again") from None
    archs = c.get("architectures") or []
    if c.get("model_type") != "gpt2" or (archs and "GPT2LMHeadModel" not in archs):
        raise UserError(f"{path} describes a {c.get('model_type')!r} model "
                        f"({', '.join(archs) or 'no architecture'}); only GPT2LMHeadModel "
                        "(model_type 'gpt2') can be imported")
    n_embd = c.get("n_embd", 768)
    unsupported = {
        "activation_function": c.get("activation_function", "gelu_new") not in TANH_GELUS,
        "n_inner": c.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": c.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(c.get("scale_attn_by_inverse_layer_idx")),
        "add_cross_attention": bool(c.get("add_cross_attention")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise UserError(f"{path}: {key} = {c.get(key)!r} is not GPT-2's architecture "
                            f"(randyGPT has the tanh GELU, a 4x MLP and 1/sqrt(head size) "
                            "attention); this model cannot be imported")
    cfg = ModelConfig(vocab_size=c.get("vocab_size", 50257), block_size=c.get("n_positions",
                      1024), n_layer=c.get("n_layer", 12), n_embd=n_embd,
                      n_head=c.get("n_head", 12), dropout=0.0,
                      norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
                      tied_head=bool(c.get("tie_word_embeddings", True)), **GPT2_ARCH)
    cfg.validate()
    return cfg


_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 (bf16: its 16 bits are the top half of
    a float32). Memory-mapped, so a large file is read once, into the float32 copies."""
    size = os.path.getsize(path)

    def bad(what):
        return UserError(f"{path} {what}; if it was downloaded, fetch it again")

    with open(path, "rb") as f:
        header, start = read_safetensors_header(f, size, bad, "weights file")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start \
        else np.zeros(0, np.uint8)
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t.get("dtype") not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {t.get('dtype')}; randyGPT reads "
                            f"{', '.join(_DTYPES)} (convert the weights to float32)")
        a, b = t["data_offsets"]
        dtype, shape = np.dtype(_DTYPES[t["dtype"]]), tuple(t["shape"])
        if not 0 <= a <= b <= data.size or b - a != dtype.itemsize * int(np.prod(shape)):
            raise UserError(f"{path}: tensor {name} lies outside the file; the download is "
                            "incomplete: fetch it again")
        raw = data[a:b].view(dtype).reshape(shape)
        if t["dtype"] == "BF16":
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = raw.astype(np.float32)
    return out


def read_weights(directory: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """model.safetensors -> randyGPT's tensors by name (float32), checked against cfg."""
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
            raise UserError(f"{directory} has only pytorch_model.bin, a pickle that randyGPT "
                            "never opens; convert it once with transformers: GPT2LMHeadModel."
                            "from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")
        raise UserError(f"{directory} has no model.safetensors (see the README's GPT-2 section)")
    hf = {(k[len("transformer."):] if k.startswith("transformer.") else k): v
          for k, v in read_safetensors(path).items() if not k.endswith(_IGNORED)}
    head = hf.pop("lm_head.weight", None)          # (V, C); absent when saved tied
    params = {}
    for name, shape in parameter_shapes(cfg):
        if name == "lm_head":
            if head is None:
                raise UserError(f"{path} has no lm_head.weight, but config.json says "
                                "tie_word_embeddings is false; the file does not fit its config")
            params[name] = np.ascontiguousarray(head.T)
            continue
        key = hf_name(name)
        if key not in hf:
            raise UserError(f"{path} has no tensor {key} (or transformer.{key}); it does not "
                            "fit its config.json")
        if hf[key].shape != shape:
            raise UserError(f"{path}: {key} has shape {hf[key].shape}, config.json says "
                            f"{shape}; the file does not fit its config")
        params[name] = hf.pop(key)
    if hf:
        shown = ", ".join(sorted(hf)[:5]) + (" ..." if len(hf) > 5 else "")
        raise UserError(f"{path} has tensors that GPT-2 does not: {shown}; it is not a plain "
                        "GPT2LMHeadModel")
    return params


def read_tokenizer(directory: str):
    """tokenizer.json, else vocab.json + merges.txt -> a GPT2Tokenizer."""
    from .tokenizer import GPT2Tokenizer
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return GPT2Tokenizer(f.read())
    vocab, merges = (os.path.join(directory, n) for n in ("vocab.json", "merges.txt"))
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return GPT2Tokenizer.from_vocab_and_merges(vocab, merges)
    raise UserError(f"{directory} has no tokenizer: it needs tokenizer.json, or vocab.json and "
                    "merges.txt (they come with every GPT-2 download)")


def load_hf(directory: str, dtype=np.float32, backend="reference"):
    """A Hugging Face GPT-2 directory -> (GPT model, tokenizer)."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory!r} is not a directory; give the folder that holds the "
                        "model's config.json")
    cfg = read_config(directory)
    params = read_weights(directory, cfg)
    tokenizer = read_tokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{cfg.vocab_size}; they do not belong together")
    model = GPT(cfg, seed=None, dtype=dtype, backend=backend)
    for name, value in params.items():
        model.params[name][...] = value
    return model, tokenizer


def import_hf(directory: str, out_path: str, force: bool = False) -> tuple:
    """Write a Hugging Face GPT-2 directory as a randyGPT checkpoint; (model, tokenizer)."""
    from .checkpoint import save_checkpoint
    if os.path.exists(out_path) and not force:
        raise UserError(f"{out_path} already exists; pass {{field}} to overwrite it, or choose "
                        "another path", "force")
    model, tokenizer = load_hf(directory)
    save_checkpoint(out_path, model, tokenizer)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# writing one

def export_hf(checkpoint_path: str, directory: str, force: bool = False) -> None:
    """A GPT-2-variant checkpoint -> config.json, model.safetensors and the tokenizer's files."""
    from safetensors.numpy import save

    from .checkpoint import load_checkpoint, write_atomic
    ckpt = load_checkpoint(checkpoint_path, optimizer=False)
    cfg, params = ckpt.model_config, ckpt.model.params
    if any(getattr(cfg, k) != v for k, v in GPT2_ARCH.items()):
        raise UserError(f"{checkpoint_path} is randyGPT's own architecture ({cfg.norm}, "
                        f"{cfg.activation}, bias {cfg.bias}), not GPT-2's; only GPT-2-variant "
                        "checkpoints (made by import-hf, or fine-tuned from one) can be exported")
    if os.path.isdir(directory) and os.listdir(directory) and not force:
        raise UserError(f"{directory} is not empty; pass {{field}} to write into it anyway, or "
                        "choose a new folder", "force")
    os.makedirs(directory, exist_ok=True)
    tensors = {"transformer." + hf_name(n): np.ascontiguousarray(params[n], dtype=np.float32)
               for n in params.names() if n != "lm_head"}
    if not cfg.tied_head:
        tensors["lm_head.weight"] = np.ascontiguousarray(params["lm_head"].T)
    tok = ckpt.tokenizer
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                  vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=None,
                  activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                  tie_word_embeddings=cfg.tied_head, resid_pdrop=cfg.dropout,
                  embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, initializer_range=0.02,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, torch_dtype="float32")
    files = {"config.json": _json(config),
             "model.safetensors": save(tensors, metadata={"format": "pt"})}
    files.update(_tokenizer_files(tok, cfg.block_size))
    for name, data in files.items():
        write_atomic(os.path.join(directory, name), data)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _tokenizer_files(tok, max_length: int) -> dict[str, bytes]:
    """tokenizer.json and the small files AutoTokenizer reads beside it; a GPT-2 tokenizer
    also as vocab.json + merges.txt (what the slow GPT2Tokenizer reads)."""
    if not hasattr(tok, "hf_json"):
        raise UserError(f"the checkpoint has a {tok.kind} tokenizer; export-hf writes BPE "
                        "tokenizers only (GPT-2's, or one trained with --bpe)")
    bos, eos = tok.bos_token, tok.eos_token
    gpt2 = tok.kind == "gpt2"
    files = {"tokenizer.json": tok.hf_json.encode("utf-8"),
             "special_tokens_map.json": _json(dict(bos_token=bos, eos_token=eos,
                                                   unk_token=eos)),
             "tokenizer_config.json": _json(dict(
                 tokenizer_class="GPT2Tokenizer" if gpt2 else "PreTrainedTokenizerFast",
                 bos_token=bos, eos_token=eos, unk_token=eos, add_prefix_space=False,
                 model_max_length=max_length, clean_up_tokenization_spaces=False))}
    if gpt2:
        model = json.loads(tok.hf_json)["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        files["vocab.json"] = _json(model["vocab"])
        files["merges.txt"] = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    return files
