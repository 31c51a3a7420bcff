"""
The student model: a Llama-family decoder-only transformer, its KV-cache sampler, and HF checkpoints.

One `Transformer` covers the architectures of the paper's students:
  - Llama 2 / 3 / 3.1 / 3.2 (`LlamaForCausalLM`; Llama-3.1 RoPE frequency scaling, tied or untied),
  - Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`: bias on the q/k/v projections),
  - Qwen3 (`Qwen3ForCausalLM`: RMSNorm on each head of q and k, explicit head_dim),
and the small from-scratch config of the embedded default. Parameter names are HF's, except that q/k/v
and gate/up are fused into one matmul each (`qkv_proj`, `gate_up_proj`); checkpoints are read and written
in the HF layout (`hf_to_ours`, `ours_to_hf`), so a directory we write loads in
`transformers.AutoModelForCausalLM.from_pretrained` unchanged and vice versa.

    python model.py CKPT_DIR --prompt "Question: ..."   # sample from a checkpoint
    python model.py CKPT_DIR --check                     # load, shape-check, print the config

Conventions: B batch, T query length, S key length, H query heads, K kv heads, D head dim, V vocab.
"""

import argparse
import functools
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message is one line naming file and tensor."""


# -----------------------------------------------------------------------------------------------
# Config: field names are exactly those of HF `config.json`, so reading and writing is a dict copy.


@dataclass
class ModelConfig:
    model_type: str = "llama"  # "llama" | "qwen2" | "qwen3": decides q/k/v bias and q/k norm
    vocab_size: int = 4096  # rows of the embedding (may exceed the tokenizer's ids: padding rows)
    hidden_size: int = 256  # residual stream width
    intermediate_size: int = 768  # SwiGLU hidden width
    num_hidden_layers: int = 8  # transformer blocks
    num_attention_heads: int = 8  # query heads H
    num_key_value_heads: Optional[int] = None  # kv heads K (grouped-query attention); None = H
    head_dim: Optional[int] = None  # D; None = hidden_size // H (Qwen3 sets it explicitly)
    max_position_embeddings: int = 1024  # longest sequence the model is meant for
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    attention_bias: bool = False  # bias on q/k/v/o (Llama, Qwen3); Qwen2 always has q/k/v bias
    mlp_bias: bool = False  # bias on gate/up/down (Llama option, rarely used)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list] = None
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02  # std of the from-scratch normal init

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in ARCHITECTURES:
            raise CheckpointError(f"unknown model_type {self.model_type!r}: expected one of {sorted(ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        """Read an HF config dict. transformers 5.x writes `rope_parameters` where 4.x wrote
        `rope_theta` + `rope_scaling`; both are accepted."""
        archs = d.get("architectures") or []
        mtype = d.get("model_type")
        if mtype not in ARCHITECTURES:
            raise CheckpointError(f"{where}: unknown architecture model_type={mtype!r} architectures={archs}: "
                                  f"expected one of {sorted(ARCHITECTURES.values())}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int):
                raise CheckpointError(f"{where}: required field {key!r} is missing or not an integer")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            kw["rope_theta"] = rope.get("rope_theta", kw.get("rope_theta", 10000.0))
            rtype = rope.get("rope_type", rope.get("type", "default"))
            kw["rope_scaling"] = None if rtype == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        elif isinstance(kw.get("rope_scaling"), dict):
            rtype = kw["rope_scaling"].get("rope_type", kw["rope_scaling"].get("type"))
            if rtype == "default":
                kw["rope_scaling"] = None
        scaling = kw.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise CheckpointError(f"{where}: rope scaling {scaling!r} is not supported (only 'llama3')")
        kw.setdefault("rms_norm_eps", 1e-6)
        kw.setdefault("tie_word_embeddings", False)  # HF's default for all three families
        if mtype == "qwen3":
            kw.setdefault("head_dim", 128)
        return cls(**kw)

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        d = asdict(self)
        d.pop("rope_theta"), d.pop("rope_scaling")
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["hidden_act"] = "silu"
        d["dtype"] = str(dtype).removeprefix("torch.")
        if self.model_type == "qwen2":
            d.pop("attention_bias"), d.pop("mlp_bias")
        return d


# Named configs (vocab_size is reset from the tokenizer when training from scratch). "tiny" is for
# tests; "embedded" is the few-million-parameter student of the default world; "llama-1b" has the
# shape of Llama-3.2-1B, for benchmarks with random weights.
CONFIGS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "embedded": dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                     rope_theta=500000.0, rms_norm_eps=1e-5,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


# -----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if torch.compiler.is_compiling():
            # The plain form, which the compiler fuses with its neighbours. Statistics in fp32 even under bf16
            # autocast; cast back before the gain, in HF's order.
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(x.dtype)
        # Eagerly, the same math through PyTorch's rms_norm: one fused kernel on CUDA where the plain form is
        # five (and as many saved tensors for the backward). fp32 input and gain (the training residual stream
        # under autocast): all in one call. Otherwise (bf16 weights when sampling, q/k norms under autocast)
        # the gain comes after, as HF applies it: rms_norm without a gain computes in fp32 whatever the input
        # dtype and rounds once to it, which is HF's normalise-in-fp32-then-cast, in one kernel instead of three.
        # Under CUDA autocast rms_norm is on the run-in-fp32 list and returns fp32: .to rounds it as HF does
        # (elsewhere it is a no-op).
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama-3.1 scaling when configured (llama-models `apply_scaling`):
    long wavelengths are slowed by `factor`, short ones kept, the band between blended linearly."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def rope_tables(position_ids, inv_freq, dtype):
    """cos and signed sin (B, T, 1, D) for apply_rope, in `dtype`: the angles position * inv_freq in fp32,
    each frequency twice (HF's layout: dimension i pairs with i + D/2, not with its neighbour)."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # see apply_rope


def apply_rope(x, cos, sin_signed):
    """x (B, T, H, D) rotated: x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (x1, x2 the
    halves of the head dim), as HF computes it. Written as x * cos + roll(x) * [-sin1, sin2]: roll(x) =
    [x2, x1] is one kernel where chunk, negate and concatenate are three, and moving the sign from x2 to
    sin1 changes no bit of any product."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, K, S_max, D). Slot s holds column s of the
    left-padded sequence; which slots are real is the attention mask's business."""

    def __init__(self, batch: int, max_len: int, n_kv: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        if self.k.is_cuda:  # a CUDA graph of decode_step writes these in place, at fixed addresses
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    def update(self, start, k, v):
        """Write k, v (B, K, T, D) at slots start .. start+T-1. `start` an int: return the slots up to
        the last one written, (B, K, start+T, D). `start` a tensor of the T slots (the static-shape decode
        path; Transformer.forward computes it once for all layers): return the whole cache (B, K, S_max, D);
        the caller's mask hides the slots not written yet."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(start, int):
            T = k.shape[2]
            self.k[:, :, start:start + T] = k
            self.v[:, :, start:start + T] = v
            return self.k[:, :, :start + T], self.v[:, :, :start + T]
        self.k.index_copy_(2, start, k)
        self.v.index_copy_(2, start, v)
        return self.k, self.v


def grouped_sdpa(q, k, v, mask):
    """SDPA for grouped-query attention under a mask, without SDPA's enable_gqa. On CUDA, a mask together
    with enable_gqa sends SDPA to its math kernel, which copies K and V H/K times and materialises the
    scores: every decode step and every padded batch would pay that. Instead the G = H/K query heads of a
    kv head are folded into the query length, q (B, K, G*T, D) against k, v (B, K, S, D), with the mask
    repeated for each of the G row blocks; a plain masked SDPA then runs a fused kernel and reads K/V once.
    q (B, H, T, D), mask (B, 1, T, S) bool or additive, or (B, 1, G*T, S) folded by sdpa_mask -> (B, H, T, D)."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    if mask.dim() == 4 and mask.shape[1] != 1:  # a mask per query head does not fold: SDPA's own GQA
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    qf = q.reshape(B, K, G * T, D)  # query head h = kvh * G + g -> row g * T + t of kv head kvh
    mf = mask  # (B, 1, G*T, S) already when sdpa_mask folded it
    if mask.shape[-2] != G * T:
        mf = mask.expand(B, 1, T, S).unsqueeze(2).expand(B, 1, G, T, S).reshape(B, 1, G * T, S)  # (B, 1, G*T, S)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)  # (B, K, G*T, D), whatever its memory layout
    return out.reshape(B, H, T, D)  # reshape, not view: fused kernels may return a transposed layout


def sdpa_mask(mask, fold: int, dtype):
    """The (B, 1, T, S) bool mask as SDPA's kernels take it, made once per forward instead of in every layer:
    additive, 0 where a key is visible and -inf elsewhere (the conversion SDPA otherwise makes inside each
    call, so the results are the same bit for bit). fold = G > 1 repeats it for grouped_sdpa's folded query
    rows, (B, 1, G*T, S), as sdpa() folds grouped-query heads on CUDA. The rows are allocated padded to a
    multiple of 16 elements and sliced back, so the memory-efficient kernel's alignment needs no copy."""
    B, _, T, S = mask.shape
    padded = (S + 15) // 16 * 16
    bias = torch.full((B, 1, fold, T, padded), float("-inf"), dtype=dtype, device=mask.device)
    bias[..., :S].masked_fill_(mask[:, :, None], 0.0)  # (B, 1, 1, T, S) over the G row blocks
    return bias.view(B, 1, fold * T, padded)[..., :S]  # (B, 1, G*T, S)


def folds_query_heads(q_heads: int, kv_heads: int, is_cuda: bool) -> bool:
    """Whether sdpa() sends masked grouped-query attention through grouped_sdpa (and sdpa_mask must fold)."""
    return is_cuda and q_heads != kv_heads


def sdpa(q, k, v, mask, causal: bool = True):
    """PyTorch's SDPA for q (B, H, T, D), k, v (B, K, S, D): mask (B, 1, T, S) bool or additive (sdpa_mask),
    or None for causal (T == S) or, with causal=False, full attention. Masked grouped-query attention on
    CUDA goes through grouped_sdpa; on the CPU, SDPA's own GQA handles a mask well."""
    if mask is not None and folds_query_heads(q.shape[1], k.shape[1], q.is_cuda):
        return grouped_sdpa(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


def attention(q, k, v, mask, backend: str = "sdpa"):
    """q (B, H, T, D); k, v (B, K, S, D) with H a multiple of K; mask (B, 1, T, S) bool (True = may
    attend) or None for plain causal attention with T == S. Returns (B, H, T, D)."""
    if backend == "triton" and q.shape[2] > 1:  # decode steps (T = 1) use SDPA: see attention.py
        from attention import flash_attention  # the custom kernel; pick_attention_backend checked it loads
        return flash_attention(q, k, v, mask)
    if backend in ("sdpa", "triton"):
        return sdpa(q, k, v, mask)
    # "math": the explicit softmax, readable reference. Query heads are grouped by the kv head they
    # share, so K/V are broadcast instead of copied H/K times.
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    qg = q.view(B, K, H // K, T, D)  # (B, K, G, T, D)
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)).float() / math.sqrt(D)  # (B, K, G, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    else:
        mask = mask.unsqueeze(2)  # (B, 1, 1, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    return (probs @ v.unsqueeze(2)).view(B, H, T, D)  # (B, K, G, T, D) -> (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.K, self.D = H, K, D
        # q, k and v in one matmul: rows [q (H*D) | k (K*D) | v (K*D)]. Checkpoints keep HF's separate
        # q_proj / k_proj / v_proj (see hf_to_ours / ours_to_hf).
        self.qkv_proj = nn.Linear(cfg.hidden_size, (H + 2 * K) * D, bias=cfg.qkv_bias)
        self.qkv_proj.rows = [H * D, K * D, K * D]
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.model_type == "qwen3":  # Qwen3 normalises each head of q and k before RoPE
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin_signed, mask, cache: Optional[KVCache], cache_start, backend: str):
        B, T, _ = x.shape
        H, K, D = self.H, self.K, self.D
        qk, v = self.qkv_proj(x).split([(H + K) * D, K * D], dim=-1)
        v = v.view(B, T, K, D)  # (B, T, K, D)
        if hasattr(self, "q_norm"):  # Qwen3: each head of q and k normalised, then rotated
            q, k = qk.view(B, T, H + K, D).split([H, K], dim=2)
            q, k = apply_rope(self.q_norm(q), cos, sin_signed), apply_rope(self.k_norm(k), cos, sin_signed)
        else:  # q and k sit side by side in the projection's output: rotated in one go
            q, k = apply_rope(qk.view(B, T, H + K, D), cos, sin_signed).split([H, K], dim=2)  # (B, T, H|K, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, D)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)  # (B, K, S, D)
        y = attention(q, k, v, mask, backend)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))  # (B, T, H*D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # [gate | up]
        self.gate_up_proj.rows = [cfg.intermediate_size] * 2
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin_signed, mask, cache, cache_start, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin_signed, mask, cache, cache_start, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.attn = pick_attention_backend(attn)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.caches: Optional[list[KVCache]] = None
        self.apply(self._init_weights)
        # Scaled init of the projections that write into the residual stream (GPT-2 / nanoGPT): keeps
        # the stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # Block by block for the fused projections: the same draws, in the same order, as separate
            # q/k/v and gate/up layers, so a seed gives the same model as with HF's layout.
            for block in module.weight.split(getattr(module, "rows", [module.weight.shape[0]])):
                nn.init.normal_(block, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay fp32 whatever dtype the weights are cast to (bf16 would round them).
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection (V, hidden): the embedding matrix itself when tied."""
        return self.lm_head.weight

    def setup_cache(self, batch: int, max_len: int):
        p = self.lm_head.weight
        # Under autocast (fp32 weights, bf16 matmuls) keys and values are kept in the autocast dtype.
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        shape = (batch, self.config.num_key_value_heads, max_len, self.config.head_dim)
        if self.caches is not None and self.caches[0].k.shape == shape and self.caches[0].k.dtype == dtype \
                and self.caches[0].k.device == p.device:
            for c in self.caches:  # reuse: a captured CUDA graph keeps pointing at these buffers
                c.k.zero_(), c.v.zero_()
            return
        self.caches = [KVCache(batch, max_len, self.config.num_key_value_heads, self.config.head_dim, dtype, p.device)
                       for _ in range(self.config.num_hidden_layers)]

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache_start=None,
                key_mask=None, return_hidden: bool = False, last_only: bool = False, logits: bool = True):
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only), and the final hidden
        states (B, T, hidden) with return_hidden. logits=False returns only the final (normed) hidden
        states and never runs the lm_head: for cross_entropy.py's chunked_cross_entropy / chunked_token_logprobs.

        Training / scoring: `attention_mask` (B, T) marks real tokens (left padding allowed); positions
        are derived from it so a left-padded row is computed exactly as the unpadded one.
        Decoding: `cache_start` is the slot where these tokens go in the KV cache. As an int, `key_mask`
        (B, S) marks the real slots of the cached sequence so far, S = cache_start + T. As a 0-d tensor
        (decode_step), `key_mask` covers the whole cache (B, S_max) and every shape is fixed.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        if cache_start is None:
            mask = None
            if attention_mask is not None:
                km = attention_mask.bool()
                if position_ids is None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                if not km.all():  # all-real rows can use the plain causal kernel
                    mask = causal_mask(km, 0, T)
            if position_ids is None:
                position_ids = torch.arange(T, device=dev).expand(B, T)
            cache = [None] * len(self.model.layers)
        else:
            assert self.caches is not None, "call setup_cache() before decoding"
            assert position_ids is not None and key_mask is not None
            mask = causal_mask(key_mask.bool(), cache_start, T)
            cache = self.caches
            if torch.is_tensor(cache_start):  # the slots this step writes, (T,), once rather than in every layer
                cache_start = cache_start + torch.arange(T, device=dev)
        x = self.model.embed_tokens(input_ids)
        cos, sin_signed = rope_tables(position_ids, self.inv_freq, x.dtype)  # (B, T, 1, D) each
        if mask is not None and self.attn == "sdpa":  # once here rather than in each layer's SDPA call
            H, K = self.config.num_attention_heads, self.config.num_key_value_heads
            # in the dtype SDPA computes in: under autocast, autocast's (a float32 mask would be cast per call)
            dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
            mask = sdpa_mask(mask, H // K if folds_query_heads(H, K, dev.type == "cuda") else 1, dt)
        for layer, c in zip(self.model.layers, cache):
            x = layer(x, cos, sin_signed, mask, c, cache_start, self.attn)
        h = self.model.norm(x)
        if not logits:
            return h
        out = self.lm_head(h[:, -1:] if last_only else h)
        return (out, h) if return_hidden else out

    # --- checkpoints in the HF layout ---------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, attn: str = "sdpa") -> "Transformer":
        path = Path(path)
        recover_dir(path)
        cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg, attn=attn)
        state = read_safetensors(path)
        expected = ours_to_hf(model.state_dict(), cfg)  # names and shapes checked in the file's layout
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
            state.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
        for name, t in expected.items():
            if name not in state:
                raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
            if tuple(state[name].shape) != tuple(t.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                      f"expected {tuple(t.shape)} from config.json")
        unexpected = [n for n in sorted(set(state) - set(expected)) if not n.endswith("rotary_emb.inv_freq")]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) "
                                  f"for {cfg.model_type}")
        dtype = dtype or next(iter(state.values())).dtype
        model = model.to_empty(device=device)
        model.load_state_dict(hf_to_ours({k: v.to(dtype) for k, v in state.items()}), strict=False, assign=False)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(dtype=dtype)

    def save_pretrained(self, path, dtype=None, max_shard_bytes: int = 4 << 30, extra=None, state_dict=None):
        """Write config.json and model.safetensors (sharded with an index above max_shard_bytes).
        The directory is assembled beside the target and renamed into place, so a crash leaves either
        the old checkpoint or the new one, never half of each. `extra(tmp_dir)` may add files (the
        tokenizer, the training state) to the same atomic write. `state_dict`: the weights to write
        instead of this module's own (e.g. an FSDP model's, gathered onto one rank)."""
        from safetensors.torch import save_file
        path = Path(path)
        dtype = dtype or self.lm_head.weight.dtype
        # copy=True: the split q/k/v and gate/up views must not share storage (safetensors refuses that)
        state = {k: v.detach().to("cpu", dtype, copy=True).contiguous()
                 for k, v in ours_to_hf(self.state_dict() if state_dict is None else state_dict, self.config).items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        shards, cur, size = [], {}, 0
        for name in sorted(state):
            n = state[name].numel() * state[name].element_size()
            if cur and size + n > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = state[name]
            size += n
        shards.append(cur)

        def write(tmp: Path):
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf(dtype), indent=2) + "\n")
            if len(shards) == 1:
                save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                    weight_map.update({k: fname for k in shard})
                total = sum(t.numel() * t.element_size() for t in state.values())
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            if extra is not None:
                extra(tmp)

        atomic_dir(path, write)


# The HF layout differs from ours only in the fused projections: HF keeps q_proj / k_proj / v_proj and
# gate_proj / up_proj apart, we stack their rows (and biases) in that order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _split_name(name: str):
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn', 'q_proj', 'weight')."""
    module, _, leaf = name.rpartition(".")
    parent, _, proj = module.rpartition(".")
    return parent, proj, leaf


def hf_to_ours(state: dict) -> dict:
    """An HF-layout state dict -> ours: q/k/v and gate/up tensors concatenated; everything else as is."""
    out = dict(state)
    for name in state:
        parent, proj, leaf = _split_name(name)
        for fused, parts in FUSED.items():
            if proj == parts[0]:
                out[f"{parent}.{fused}.{leaf}"] = torch.cat([out.pop(f"{parent}.{p}.{leaf}") for p in parts])
    return out


def ours_to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> the HF layout: fused tensors split back into views of their row blocks."""
    H, K, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    rows = {"qkv_proj": [H * D, K * D, K * D], "gate_up_proj": [I, I]}
    out = {}
    for name, t in state.items():
        parent, proj, leaf = _split_name(name)
        if proj in FUSED:
            out.update({f"{parent}.{p}.{leaf}": part for p, part in zip(FUSED[proj], t.split(rows[proj]))})
        else:
            out[name] = t
    return out


def fuse_optimizer_state(saved: dict, opt: torch.optim.Optimizer, model: "Transformer") -> dict:
    """An optimizer state_dict saved while q/k/v and gate/up were separate parameters (one entry each, in
    the HF order) -> one that `opt` (the same groups over this model's parameters) loads. A fused
    parameter's per-element state (Adam's moments) is its parts' concatenated; the rest (step) the first's.
    A state saved with the fused parameters already is returned as it is."""
    if [len(g["params"]) for g in saved["param_groups"]] == [len(g["params"]) for g in opt.param_groups]:
        return saved
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups, new_i = {}, [], 0
    for g_saved, g in zip(saved["param_groups"], opt.param_groups):
        old, ids = iter(g_saved["params"]), []
        for p in g["params"]:
            n_parts = len(FUSED.get(_split_name(names.get(id(p), ""))[1], ("",)))  # 3 for qkv, 2 for gate_up
            parts = [saved["state"].get(next(old)) for _ in range(n_parts)]
            if parts[0] is not None:
                state[new_i] = {k: torch.cat([s[k] for s in parts]) if torch.is_tensor(v) and v.dim() else v
                                for k, v in parts[0].items()}
            ids.append(new_i)
            new_i += 1
        groups.append({**g_saved, "params": ids})
    return {"state": state, "param_groups": groups}


def atomic_dir(path: Path, write) -> None:
    """Build a directory with `write(tmp_dir)` next to `path`, then swap it in with renames.
    Files already in `path` that `write` did not produce (e.g. metrics.jsonl) are carried over."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if path.exists():
        for f in path.iterdir():
            if not (tmp / f.name).exists() and not f.name.startswith("model-"):
                if f.is_dir():
                    shutil.copytree(f, tmp / f.name)
                else:
                    shutil.copy2(f, tmp / f.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """If a crash hit between the two renames of `atomic_dir`, put the previous checkpoint back."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)


RUN_FILES = ("metrics.jsonl",)  # what a training run writes into its --out before its first checkpoint


def check_out_dir(out, resume: bool, overwrite: bool) -> None:
    """The --out of a training run (sft.py, ppo.py), checked before anything is written: a new or empty
    directory, the same run's leftovers, or a checkpoint to --resume or to --overwrite. A file, or a
    directory holding other things, is refused (writing a checkpoint there would replace some of them).
    First, a checkpoint left half-swapped by a crash in atomic_dir is put back (by rank 0 under torchrun)."""
    out = Path(out)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        recover_dir(out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank checks the recovered directory
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: exists and is not a directory; expected a checkpoint directory to write")
    if resume and not (out / "train_state.pt").exists():
        raise CheckpointError(f"--out {out}: --resume given but there is no checkpoint with train_state.pt to "
                              f"resume from")
    if (out / "config.json").exists():
        if not resume and not overwrite:
            raise CheckpointError(f"--out {out}: a checkpoint already exists; pass --resume to continue it or "
                                  f"--overwrite")
    elif out.is_dir() and not overwrite:
        others = sorted(f.name for f in out.iterdir() if f.name not in RUN_FILES)
        if others:
            named = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise CheckpointError(f"--out {out}: a directory that is not a checkpoint and holds other files ({named}); "
                                  f"expected a new or empty directory (or --overwrite)")


def resolve_device(name: str) -> str:
    """--device: auto (CUDA when there is a GPU, else the CPU), cpu or cuda (under torchrun, each rank's
    own GPU; CUDA_VISIBLE_DEVICES picks one otherwise)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    return name


def read_json(file: Path) -> dict:
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for fname in files:
        f = path / fname
        if not f.exists():
            raise CheckpointError(f"{f}: weights file not found")
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
            raise CheckpointError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    return state


_warned = set()


def pick_attention_backend(name: str) -> str:
    if name not in ("sdpa", "math", "triton"):
        raise ValueError(f"unknown attention backend {name!r}: expected sdpa, math or triton")
    if name == "triton":
        ok = torch.cuda.is_available()
        try:
            import attention  # noqa: F401
        except ImportError:
            ok = False
        if not ok:
            if "triton" not in _warned:
                warnings.warn("attn='triton' needs CUDA and attention.py; falling back to SDPA")
                _warned.add("triton")
            return "sdpa"
    return name


def causal_mask(key_mask, start, T: int):
    """Boolean (B, 1, T, S) mask: query i (cache slot start+i) may attend key slot j if the key is real
    and j <= start+i. A query with no visible key (a left-pad position) is allowed itself, so softmax
    never sees an empty row; its output is never used. `start` may be a 0-d tensor (decode_step)."""
    B, S = key_mask.shape
    q_slot = start + torch.arange(T, device=key_mask.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    m = key_mask[:, None, :] & (k_slot <= q_slot)[None]  # (B, T, S)
    m = m | (k_slot == q_slot)[None]
    return m[:, None]  # (B, 1, T, S)


# -----------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) generated ids; pad after a row's stop token
    logprobs: torch.Tensor  # (B, N) log p(token) under softmax(logits / T) (T = 1 for greedy)
    entropies: torch.Tensor  # (B, N) entropy of that same distribution
    mask: torch.Tensor  # (B, N) 1 on generated tokens up to and including the stop token
    finished: torch.Tensor  # (B,) True where a stop token was produced


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Ragged prompts -> (B, P) ids and mask, right-aligned so every row's next token is column P."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def sample_token(logits, temperature: float, top_k: int, top_p: float, generator=None, noise=None):
    """logits (B, V) fp32 -> (token (B,), logprob (B,), entropy (B,)). Log-prob and entropy are those
    of the policy's distribution softmax(logits / T), before any top-k / top-p truncation: that is
    the distribution PPO's ratio and CCRL's confidence are defined on (use top_k=0, top_p=1 there).
    noise: (B, V) fp32 Exp(1) draws for the exponential race (race_noise), when the caller draws them (a
    compiled step cannot take a generator); by default they are drawn here."""
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / t, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if temperature <= 0:
        token = logits.argmax(-1)
    else:
        filt = logp
        if top_k > 0:
            kth = torch.topk(filt, min(top_k, filt.shape[-1]), dim=-1).values[:, -1:]
            filt = filt.masked_fill(filt < kth, float("-inf"))
        if top_p < 1.0:
            sorted_lp, idx = filt.sort(dim=-1, descending=True)
            cum = sorted_lp.exp().cumsum(-1)
            drop = cum - sorted_lp.exp() > top_p  # keep the smallest prefix whose mass reaches top_p
            filt = filt.scatter(-1, idx, sorted_lp.masked_fill(drop, float("-inf")))
        # Exponential race: argmax p / E with E ~ Exp(1) samples from p. It is the draw torch.multinomial makes
        # for one sample (the same tokens for the same generator), without multinomial's input checks, which
        # on CUDA cost a device->host sync per token.
        e = noise if noise is not None else race_noise(filt.shape, filt.device, generator)
        token = (filt.exp() / e).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1), entropy


def race_noise(shape, device, generator=None):
    """The Exp(1) draws of one exponential-race sample, fp32 (B, V)."""
    return torch.empty(shape, device=device).exponential_(1, generator=generator)


def decode_step(model: Transformer, tokens, positions, slot, key_mask):
    """One decoding step with every shape fixed, so torch.compile(mode="reduce-overhead") captures it once
    as a CUDA graph: tokens (B, 1), positions (B, 1) their RoPE positions, slot a 0-d long tensor (the
    cache slot they are written to), key_mask (B, S_max) bool over the whole cache. Attention reads the
    full cache; slots after `slot` (not written yet) are masked out by causality. -> fp32 logits (B, V)."""
    return model(tokens, position_ids=positions, cache_start=slot, key_mask=key_mask)[:, -1].float()


def decode_sample_step(model: Transformer, tokens, positions, slot, key_mask, noise, temperature: float,
                       top_k: int, top_p: float):
    """decode_step, then sample_token on its logits: what generate(compile=True) compiles, so that one CUDA
    graph holds the forward and the sampling, which eagerly are some twenty small kernels per token, each
    reading or writing the (B, V) fp32 logits. noise: race_noise's draws (None when greedy), made by the
    caller from its generator, so the compiled sampler draws the same numbers the eager one does."""
    logits = decode_step(model, tokens, positions, slot, key_mask)
    return sample_token(logits, temperature, top_k, top_p, noise=noise)


COMPILE_DEVICES = ("cuda",)  # where generate(compile=True) compiles (the tests add "cpu" with an aot_eager compile)
# Inductor's settings for the decode step: mode "reduce-overhead" (the step as a CUDA graph) plus coordinate
# descent tuning of the generated kernels' block sizes. With the latter on, Inductor also rewrites a matmul
# whose input has one row (batch 1: every projection and the lm_head is a matrix-vector product, bound by
# reading the weights) as a multiply-and-sum kernel of its own, which Inductor's source notes is how its
# matrix-vector products reach the memory bandwidth. Costs compile time; changes the order of the sums
# only (bench.py checks greedy tokens eager == compiled at batch 1).
DECODE_COMPILE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


@functools.cache
def compiled_decode_sample_step():
    # dynamic=False: each batch size and cache length is a graph of its own with its sizes as constants (a
    # CUDA graph is per shape anyway). The cache buffers' fixed shapes pin them already (seen on the CPU:
    # batch 2 then 3 compiles two static graphs even without the flag); the flag keeps it so.
    return torch.compile(decode_sample_step, options=DECODE_COMPILE_OPTIONS, fullgraph=True, dynamic=False)


@torch.no_grad()
def all_done(finished, across_ranks: bool) -> bool:
    left = (~finished).sum()  # a host sync
    if across_ranks:
        torch.distributed.all_reduce(left)
    return int(left) == 0


def compiled_cache_len(prompt_len: int, max_new_tokens: int) -> int:
    """Cache slots of a compiled generate: rounded up to a multiple of 64, so few shapes get compiled."""
    return math.ceil((prompt_len + max_new_tokens) / 64) * 64


@torch.no_grad()  # sampling never needs a graph; with one, every step's activations would be kept
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids=(), pad_id: int = 0, generator=None,
             sync_every: int = 8, compile: bool = False, static: Optional[bool] = None,
             across_ranks: bool = False) -> Generation:
    """Batched sampling with the static KV cache. Prompts are left-padded; each row stops at its first
    stop token (later positions hold pad_id with mask 0). temperature=0 is greedy.

    static: decode with decode_step over the whole cache (fixed shapes) rather than the cache sliced to
    the current length; the same tokens either way. None = on CUDA only (on a CPU slicing is cheaper).
    compile=True (CUDA only; ignored elsewhere) runs decode_sample_step, the forward and the sampling, as
    one compiled CUDA graph; the same tokens as eager for the same generator (the race's noise is drawn
    outside the graph, in the eager order). The cache length is then rounded up to a multiple of 64 (fewer
    distinct shapes to compile) and the cache is kept on the model for the next call, so the graph replays
    on the same buffers; `model.caches = None` frees it. temperature, top_k and top_p are constants of
    the graph: another value compiles another graph.
    across_ranks: decode until every rank's rows are done, not just this rank's: under FSDP each forward
    is a collective, so all ranks must take the same number of steps."""
    dev = model.lm_head.weight.device
    compiled = compile and dev.type in COMPILE_DEVICES
    static = compiled or (dev.type == "cuda" if static is None else static)
    step = compiled_decode_sample_step() if compiled else None
    ids, pmask = left_pad(prompts, pad_id, dev)
    B, P = ids.shape
    S = compiled_cache_len(P, max_new_tokens) if compiled else P + max_new_tokens  # cache slots
    model.setup_cache(B, S)
    key_mask = torch.cat([pmask.bool(), torch.ones(B, S - P, dtype=torch.bool, device=dev)], dim=1)  # (B, S)
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, max_new_tokens, device=dev)
    entropies = torch.zeros(B, max_new_tokens, device=dev)
    gmask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    logits = model(ids, position_ids=pos, cache_start=0, key_mask=key_mask[:, :P], last_only=True)[:, -1].float()
    tok, lp, ent = sample_token(logits, temperature, top_k, top_p, generator)  # the first new token
    next_pos = pos[:, -1:] + 1  # (B, 1)
    slot = torch.tensor(P, device=dev)
    for i in range(max_new_tokens):
        alive = ~finished
        tok = torch.where(alive, tok, pad_id)
        out[:, i] = tok
        logprobs[:, i] = torch.where(alive, lp, 0.0)
        entropies[:, i] = torch.where(alive, ent, 0.0)
        gmask[:, i] = alive.long()
        finished = finished | (alive & torch.isin(tok, stop))
        if i + 1 == max_new_tokens or ((i + 1) % sync_every == 0 and all_done(finished, across_ranks)):
            break
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were copied out above
            noise = race_noise(logits.shape, dev, generator) if temperature > 0 else None  # (B, V)
            # specialize_float: temperature and top_p become constants of the graph; otherwise a second value
            # would turn them into 0-d CPU tensor inputs of every later graph.
            with torch._dynamo.config.patch(specialize_float=True):
                tok, lp, ent = step(model, tok[:, None], next_pos, slot, key_mask, noise, temperature, top_k, top_p)
        else:
            if static:
                logits = decode_step(model, tok[:, None], next_pos, slot, key_mask)
            else:
                logits = model(tok[:, None], position_ids=next_pos, cache_start=P + i,
                               key_mask=key_mask[:, :P + i + 1])[:, -1].float()
            tok, lp, ent = sample_token(logits, temperature, top_k, top_p, generator)
        next_pos, slot = next_pos + 1, slot + 1
    n = i + 1
    if not compiled:
        model.caches = None  # free the cache memory between calls
    return Generation(out[:, :n], logprobs[:, :n], entropies[:, :n], gmask[:, :n], finished)


# -----------------------------------------------------------------------------------------------
# CLI: inspect or sample from a checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description="Load a checkpoint directory; check it or sample from it.")
    ap.add_argument("ckpt", help="checkpoint directory (config.json + model.safetensors + tokenizer)")
    ap.add_argument("--check", action="store_true", help="only load, shape-check and print the config")
    ap.add_argument("--prompt", default="Question: ", help="prompt text (rendered with the tokenizer's template)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = ap.parse_args(argv)
    try:
        model = Transformer.from_pretrained(args.ckpt)
        print(f"{args.ckpt}: {model.config.model_type}, {model.num_params() / 1e6:.2f}M parameters")
        if args.check:
            print(json.dumps(model.config.to_hf(), indent=2))
            return
        from tokenizer import Tokenizer
        tok = Tokenizer.load(args.ckpt)
        ids, _ = tok.render(args.prompt)
        g = generate(model.eval(), [ids], args.max_new_tokens, args.temperature, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
        print(args.prompt + tok.decode([t for t in g.tokens[0][g.mask[0].bool()].tolist() if t not in tok.stop_ids]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
