r"""The T5 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer"), in its v1.1 form: the frozen text encoder of Imagen (Saharia et al. 2022,
T5-XXL) and DeepFloyd IF.

Chapter 13 (Imagen) describes it; the appendix counts the full-size one (preset
``"t5-v1_1-xxl-encoder"``, 4,762,310,656 parameters). What differs from BERT (:mod:`.bert`):

* **pre-norm with RMS norm** (Zhang & Sennrich 2019): no mean subtraction, no bias,

  .. math:: \mathrm{RMSNorm}(x) = g \odot x \,/\, \sqrt{\tfrac1D \textstyle\sum_j x_j^2 + \epsilon};

  each sub-layer is :math:`x \leftarrow x + F(\mathrm{RMSNorm}(x))`, and a final RMS norm closes the stack;
* **no** :math:`1/\sqrt{d}` **in the attention scores**: :math:`\mathrm{softmax}(Q K^\top + B + M) V`
  (T5 folds the scale into the initialisation of :math:`W_q`);
* **relative position biases** instead of position embeddings (section 2.1 of the paper): a learned
  scalar per head and per *bucket* of the offset :math:`r = j - i` (key minus query), added to the
  scores. Only block 0 owns the table (``relative_attention_bias``, buckets x heads); the bias
  :math:`B` it gives is computed once and shared by every block. Bidirectional buckets, with
  :math:`n_b` = ``relative_attention_num_buckets`` (32) and ``max_distance`` (128):
  half of the buckets for :math:`r > 0`, half for :math:`r \le 0`; within a half (:math:`h = n_b/2`
  buckets, :math:`e = h/2` of them exact),

  .. math:: \mathrm{bucket}(|r|) = \begin{cases} |r| & |r| < e \\
            \min\!\Big(h - 1,\; e + \big\lfloor \frac{\log(|r|/e)}{\log(\text{max\_distance}/e)}\,(h - e)
            \big\rfloor\Big) & |r| \ge e \end{cases}

  so nearby offsets are told apart exactly and far ones share logarithmically wider buckets;
* **the feed-forward** of v1.1 is gated GELU (Shazeer 2020, "GLU Variants Improve Transformer"),
  :math:`W_o\big(\mathrm{gelu}(W_{i0} x) \odot W_{i1} x\big)` with the tanh approximation of GELU
  (``"gelu_new"``); T5 v1.0 used :math:`W_o\,\mathrm{relu}(W_i x)`. No linear layer has a bias.

Parameter names are those of ``transformers.T5EncoderModel``::

    shared                     (= encoder.embed_tokens, the same module: counted once)
    encoder.block.{i}.layer.0.SelfAttention.{q, k, v, o}
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias
    encoder.block.{i}.layer.0.layer_norm
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0, wi_1, wo}     (v1.0: wi, wo)
    encoder.block.{i}.layer.1.layer_norm
    encoder.final_layer_norm

transformers clamps fp16 activations that overflow; this module does not (run T5 in float32 or
bfloat16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "T5Config",
    "T5EncoderModel",
    "T5EncoderOutput",
    "RMSNorm",
    "relative_position_bucket",
    "load_t5_state_dict",
    "t5_encoder_from_transformers",
    "t5_encoder_from_transformers_config",
    "t5_v1_1_xxl_encoder",
]

_FEED_FORWARD = ("gated-gelu", "relu")


@dataclass
class T5Config:
    """The fields of a transformers ``T5Config`` that define the encoder (names as in
    ``config.json``). The defaults are T5 v1.1 base."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64  # per head; the attention's inner width is num_heads * d_kv (need not be d_model)
    d_ff: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 (two halves, each with "
                             f"exact and logarithmic buckets), got {self.relative_attention_num_buckets}")
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use one of "
                             f"{_FEED_FORWARD} (T5 v1.1 / v1.0)")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> T5Config:
        """From a transformers-style ``config.json`` dict; unknown keys are ignored, an unsupported
        ``feed_forward_proj`` is a ``ValueError`` naming the key."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def v1_1_xxl(cls) -> T5Config:
        """google/t5-v1_1-xxl (Imagen's and DeepFloyd IF's text encoder): d_model 4096, d_ff 10240,
        64 heads of 64, 24 layers."""
        return cls(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)

    @classmethod
    def tiny(cls, **overrides: Any) -> T5Config:
        base = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16)
        return cls(**{**base, **overrides})


@dataclass
class T5EncoderOutput:
    """``last_hidden_state`` (B, N, d_model) after ``final_layer_norm``; ``hidden_states``: the
    embeddings and the output of every block (before the final norm), then the last state, as
    transformers returns them (``num_layers + 1`` tensors), when asked for."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RMSNorm(nn.Module):
    r""":math:`g \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last axis: no mean subtraction,
    no bias (T5's ``T5LayerNorm``). The mean square is taken in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = x.float().pow(2).mean(dim=-1, keepdim=True)  # mean(x^2)
        y = x * torch.rsqrt(ms + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """The bidirectional bucket (module docstring) of each offset ``r = key - query``: integers in
    ``[0, num_buckets)``; offsets ``r > 0`` use the upper half."""
    h = num_buckets // 2  # buckets per direction
    bucket = (relative_position > 0).long() * h
    n = relative_position.abs()
    e = h // 2  # exact buckets: |r| = 0, 1, ..., e - 1
    # e + floor(log(|r|/e) / log(max_distance/e) * (h - e)), capped at h - 1 (|r| clamped to e first:
    # the log is only used where |r| >= e)
    large = e + (torch.log(n.clamp_min(e).float() / e) / math.log(max_distance / e) * (h - e)).long()
    large = large.clamp_max(h - 1)
    return bucket + torch.where(n < e, n, large)


class T5Attention(nn.Module):
    """softmax(Q K^T + B + M) V with no 1/sqrt(d) (``scale=1``), H heads of ``d_kv``, no biases.
    Block 0's owns ``relative_attention_bias`` (buckets, H)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, N: int, device: torch.device) -> torch.Tensor:
        """B: (1, H, N, N), B[0, h, i, j] = table[bucket(j - i), h]."""
        pos = torch.arange(N, device=device)
        r = pos[None, :] - pos[:, None]  # (query i, key j) -> j - i
        buckets = relative_position_bucket(r, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, d_model); ``bias`` (B or 1, H, N, N): position bias plus padding mask."""
        B, N, _ = x.shape
        H, d = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (lin(x).view(B, N, H, d).transpose(1, 2) for lin in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.cfg.dropout_rate if self.training else 0.0)
        return self.o(a.transpose(1, 2).reshape(B, N, H * d))


class T5LayerSelfAttention(nn.Module):
    """x + dropout(Attn(RMSNorm(x)))."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias))


class T5DenseGatedActDense(nn.Module):
    """v1.1: W_o (gelu_tanh(W_i0 x) * W_i1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gelu_new: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(self.dropout(h).to(self.wo.weight.dtype))


class T5DenseActDense(nn.Module):
    """v1.0: W_o relu(W_i x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))).to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    """x + dropout(FF(RMSNorm(x)))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.is_gated else T5DenseActDense(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    """``embed_tokens`` (the model's ``shared``), the blocks and ``final_layer_norm``."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(T5Block(cfg, has_relative_attention_bias=(i == 0))
                                   for i in range(cfg.num_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)


class T5EncoderModel(nn.Module):
    """The T5 encoder: (B, N) ids -> :class:`T5EncoderOutput` with ``last_hidden_state``
    (B, N, d_model). Any N: relative positions need no maximum length."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)  # the same module: one parameter, two names
        self._init_weights()

    def _init_weights(self) -> None:
        """Mesh TensorFlow's initialisation, which T5 relies on instead of 1/sqrt(d) in the scores:
        W_q ~ N(0, 1/(d_model d_kv)), W_k, W_v ~ N(0, 1/d_model), W_o ~ N(0, 1/(H d_kv)), W_i ~
        N(0, 1/d_model), W_o (FF) ~ N(0, 1/d_ff), embeddings N(0, 1), norms 1."""
        cfg = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        for block in self.encoder.block:
            a = block.layer[0].SelfAttention
            nn.init.normal_(a.q.weight, std=(cfg.d_model * cfg.d_kv) ** -0.5)
            nn.init.normal_(a.k.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(a.v.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(a.o.weight, std=(cfg.num_heads * cfg.d_kv) ** -0.5)
            if hasattr(a, "relative_attention_bias"):
                nn.init.normal_(a.relative_attention_bias.weight, std=cfg.d_model**-0.5)
            ff = block.layer[1].DenseReluDense
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(ff, name):
                    nn.init.normal_(getattr(ff, name).weight, std=cfg.d_model**-0.5)
            nn.init.normal_(ff.wo.weight, std=cfg.d_ff**-0.5)

    def _check(self, input_ids: Any, attention_mask: Any) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, N) integer tensor, got {got}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        V = self.config.vocab_size
        if input_ids.numel() and input_ids.device.type != "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids must lie in [0, {V}), found values in [{lo}, {hi}]")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != tuple(input_ids.shape)):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> T5EncoderOutput:
        """``input_ids`` (B, N); ``attention_mask`` (B, N), 1 for tokens and 0 for padding (None: no
        padding)."""
        self._check(input_ids, attention_mask)
        enc = self.encoder
        x = enc.dropout(enc.embed_tokens(input_ids))
        N = input_ids.shape[1]
        # B computed once, in block 0, and shared by all blocks: (1, H, N, N)
        bias = enc.block[0].layer[0].SelfAttention.position_bias(N, x.device).float()
        if attention_mask is not None:
            # M: 0 for a token, the most negative float for a padding key (exp of it is 0)
            pad = attention_mask.to(x.device)[:, None, None, :] == 0  # (B, 1, 1, N)
            bias = bias.masked_fill(pad, torch.finfo(torch.float32).min)
        states = [x]
        for block in enc.block:
            x = block(x, bias)
            states.append(x)
        last = enc.dropout(enc.final_layer_norm(x))
        hidden = None
        if output_hidden_states:
            hidden = tuple(states[:-1]) + (last,)  # transformers' convention: the last entry is normed
        return T5EncoderOutput(last_hidden_state=last, hidden_states=hidden)


# ----------------------------------------------------------------------------------------------------
# Loading, conversion (interop.TRANSFORMERS) and the preset (presets.PRESETS)


def load_t5_state_dict(model: T5EncoderModel, state_dict: Mapping[str, torch.Tensor], *,
                       what: str = "checkpoint") -> T5EncoderModel:
    """Load a transformers ``T5EncoderModel`` state dict strictly (a missing, unexpected or
    misshapen key is named). ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor:
    a file may hold either (safetensors stores a tied tensor once) or both, which must then be equal."""
    from ..interop import CheckpointMismatchError, load_state_dict

    sd = dict(state_dict)
    a, b = "shared.weight", "encoder.embed_tokens.weight"
    if a in sd and b in sd:
        if sd[a].shape == sd[b].shape and sd[a].device.type != "meta" and not torch.equal(sd[a], sd[b]):
            raise CheckpointMismatchError(f"{what}: {a} and {b} differ, but they are one tied embedding")
    elif a in sd or b in sd:
        sd[b if a in sd else a] = sd[a if a in sd else b]
    return load_state_dict(model, sd, what=what)


def t5_encoder_from_transformers_config(config: Mapping[str, Any]) -> T5EncoderModel:
    """An (untrained) :class:`T5EncoderModel` for a transformers ``T5EncoderModel`` config dict
    (``interop.load_pretrained`` loads a folder's weights into it with :func:`load_t5_state_dict`)."""
    return T5EncoderModel(T5Config.from_dict(config))


def t5_encoder_from_transformers(obj: nn.Module) -> T5EncoderModel:
    """transformers ``T5EncoderModel`` -> :class:`T5EncoderModel` with the same weights, dtype,
    device and mode. A ``feed_forward_proj`` other than "gated-gelu" or "relu" is a ``ValueError``
    naming it."""
    ours = T5EncoderModel(T5Config.from_dict(obj.config.to_dict()))
    load_t5_state_dict(ours, obj.state_dict(), what=f"transformers {type(obj).__name__}")
    param = next(obj.parameters(), None)
    if param is not None:
        ours.to(dtype=param.dtype, device=param.device)
    return ours.train(obj.training)


def t5_v1_1_xxl_encoder() -> T5EncoderModel:
    """google/t5-v1_1-xxl's encoder (DeepFloyd IF's ``text_encoder``): 4,762,310,656 parameters, the
    32128 x 4096 embedding counted once."""
    return T5EncoderModel(T5Config.v1_1_xxl())
