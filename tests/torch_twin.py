"""randyGPT's architecture in PyTorch, built from a ModelConfig: the one twin that the tests
and the benchmarks compare against (importing it needs torch; the tests skip without it).

Parameters have randyGPT's names and layout (matrices stored (in, out)), so weights copy
over one to one, and gradients compare by name. The norm, the activation, the biases and the
tied head are chosen by the config's `norm`, `activation`, `bias` and `tied_head`, as in
randygpt/model.py.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from randygpt.model import NORM_PARAMS, parameter_shapes

NORMS = {"rmsnorm": lambda x, p, eps: F.rms_norm(x, (x.shape[-1],), p["g"], eps),
         "layernorm": lambda x, p, eps: F.layer_norm(x, (x.shape[-1],), p["g"], p["b"], eps)}
ACTIVATIONS = {"squared_relu": lambda h: F.relu(h).square(),
               "gelu": lambda h: F.gelu(h, approximate="tanh")}


class TorchGPT(torch.nn.Module):
    def __init__(self, cfg, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.names = [name for name, _ in parameter_shapes(cfg)]
        self.weights = torch.nn.ParameterDict({
            name.replace(".", "__"): torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            for name, shape in parameter_shapes(cfg)})

    @classmethod
    def from_randygpt(cls, model) -> "TorchGPT":
        dtype = torch.float64 if model.dtype == np.float64 else torch.float32
        twin = cls(model.cfg, dtype)
        twin.load({name: model.params[name] for name in model.params.names()})
        return twin

    def p(self, name):
        return self.weights[name.replace(".", "__")]

    def load(self, params) -> None:
        with torch.no_grad():
            for name in self.names:
                self.p(name).copy_(torch.from_numpy(np.asarray(params[name])))

    def grads(self) -> dict:
        return {name: self.p(name).grad.detach().numpy() for name in self.names}

    def norm(self, x, prefix):
        p = {k: self.p(f"{prefix}.{k}") for k in NORM_PARAMS[self.cfg.norm]}
        return NORMS[self.cfg.norm](x, p, self.cfg.norm_eps)

    def linear(self, x, name):
        return x @ self.p(name) + self.p(name + ".b") if self.cfg.bias else x @ self.p(name)

    def forward(self, idx, targets=None, dropout=0.0):
        """idx (B, T) -> logits (B, T, V), or the mean cross-entropy when targets are given."""
        cfg = self.cfg
        B, T = idx.shape
        C, H = cfg.n_embd, cfg.n_head
        act = ACTIVATIONS[cfg.activation]
        x = self.p("wte")[idx] + self.p("wpe")[:T]
        for i in range(cfg.n_layer):
            h = f"h.{i}."
            qkv = self.linear(self.norm(x, h + "ln1"), h + "attn.qkv")
            q, k, v = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = self.linear(y.transpose(1, 2).reshape(B, T, C), h + "attn.proj")
            x = x + F.dropout(y, dropout, self.training)
            m = self.linear(act(self.linear(self.norm(x, h + "ln2"), h + "mlp.fc")),
                            h + "mlp.proj")
            x = x + F.dropout(m, dropout, self.training)
        head = self.p("wte").T if cfg.tied_head else self.p("lm_head")
        logits = self.norm(x, "ln_f") @ head
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-1)
