"""A small random GPT-2 built offline with transformers (test-only): the test_hf tests and
tests/fixtures/make_tiny_gpt2.py make their Hugging Face directories with it."""
from __future__ import annotations

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. "
        "résolu — ünïcode, tabs\tand\nnewlines, numbers 12345 and   spaces.\n") * 4
EOT = "<|endoftext|>"


def train_tokenizer(vocab_size=320):
    """GPT-2's tokenizer recipe (byte-level BPE, GPT-2's regex, <|endoftext|>), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def make_gpt2_dir(path, *, tied=True, seed=0, n_layer=2, n_embd=32, n_head=4, n_positions=64,
                  vocab_size=320, dtype=None):
    """A GPT2LMHeadModel with random weights (every bias and norm parameter random too, so
    each path matters) and its tokenizer, saved with save_pretrained. Returns the model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    tok = train_tokenizer(vocab_size)
    eot = tok.token_to_id(EOT)
    hf_tok = GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    hf_tok.save_pretrained(path)
    tok.model.save(str(path))               # vocab.json + merges.txt, as GPT-2 ships them too
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot,
                        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0, 0.3 if "wte" in name or "wpe" in name else 0.1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return model.eval()
