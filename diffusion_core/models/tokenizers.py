"""Tokenizers: captions -> (B, context_length) integer ids for a text encoder.

* :class:`WordTokenizer`: one id per word or punctuation mark, for the procedural "shapes world"
  captions of chapters 04-06 ("a red circle left of a blue square."), whose vocabulary is small and
  closed.
* :class:`CLIPTokenizer`: the byte-level byte-pair encoding (BPE) of CLIP (Radford et al. 2021,
  section 2.4; the BPE of Sennrich et al. 2016 over bytes, as in GPT-2), with CLIP's 49,408-token
  vocabulary, so that ids match the public CLIP and Stable Diffusion text encoders
  ("a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407]).

Both return a ``torch.long`` tensor ``(B, context_length)``: ``[start] + tokens + [end]`` followed by
padding. Both raise on a caption that does not fit unless asked to truncate, in which case the end
token is kept (the text encoder pools its feature there).
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import importlib.util
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "WordTokenizer",
    "CLIPTokenizer",
    "bytes_to_unicode",
    "default_bpe_path",
    "CaptionTooLongError",
    "UnknownWordError",
]


class CaptionTooLongError(ValueError):
    """A caption with more tokens than fit in ``context_length`` while truncation is off."""


class UnknownWordError(KeyError):
    """A word that is not in a :class:`WordTokenizer`'s vocabulary (with ``unknown="error"``)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _as_list(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {', '.join(sorted(set(bad)))}")
    return texts


def _pack(
    rows: list[list[int]],
    start: int,
    end: int,
    pad: int,
    context_length: int,
    truncate: bool,
    texts: list[str],
) -> torch.Tensor:
    """``[start] + row + [end]`` padded with ``pad`` to (B, context_length); truncation keeps ``end``."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    out = torch.full((len(rows), context_length), pad, dtype=torch.long)
    room = context_length - 2
    for b, row in enumerate(rows):
        if len(row) > room:
            if not truncate:
                raise CaptionTooLongError(
                    f"caption {b} ({texts[b][:60]!r}) has {len(row)} tokens, but only {room} fit in "
                    f"context_length={context_length} with the start and end tokens; pass truncate=True "
                    "to cut it"
                )
            row = row[:room]
        ids = [start, *row, end]
        out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------------
# Word-level tokenizer for the shapes world

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """One id per lower-cased word (a run of ``a-z0-9``) or punctuation character.

    Ids: ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then ``vocab`` in the given order.
    ``unknown="error"`` (default) raises :class:`UnknownWordError` naming the words not in the
    vocabulary, since in a closed procedural world an unknown word is a bug; ``unknown="unk"`` maps
    them to ``<unk>`` (for probing a model with novel words).
    """

    SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, vocab: Sequence[str], context_length: int, unknown: str = "error"):
        vocab = list(vocab)
        specials = [w for w in vocab if w in self.SPECIALS]
        if specials:
            raise ValueError(
                f"vocab must not contain the special tokens {specials}; they are added as ids 0-3"
            )
        dupes = sorted({w for w in vocab if vocab.count(w) > 1})
        if dupes:
            raise ValueError(f"vocab has duplicate entries: {dupes}")
        bad = [w for w in vocab if not isinstance(w, str) or _WORD.fullmatch(w) is None]
        if bad:
            raise ValueError(
                f"vocab entries must be single lower-case words or one punctuation character, got {bad[:10]}"
            )
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
        self.itos: list[str] = [*self.SPECIALS, *vocab]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.context_length = context_length
        self.unknown = unknown

    @classmethod
    def from_corpus(
        cls, captions: Iterable[str], context_length: int | None = None, unknown: str = "error"
    ) -> WordTokenizer:
        """The vocabulary of ``captions``, sorted (so it does not depend on their order).
        ``context_length`` defaults to the longest caption plus the start and end tokens."""
        captions = _as_list(captions)
        if not captions:
            raise ValueError("from_corpus needs at least one caption")
        split = [cls.split(c) for c in captions]
        vocab = sorted({w for words in split for w in words})
        if context_length is None:
            context_length = max(len(w) for w in split) + 2
        return cls(vocab, context_length, unknown=unknown)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case and split into words and punctuation: ``"A red, big circle."`` ->
        ``["a", "red", ",", "big", "circle", "."]``."""
        return _WORD.findall(text.lower())

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str) -> list[int]:
        """The ids of one caption, without start/end/padding."""
        words = self.split(text)
        missing = [w for w in words if w not in self.stoi]
        if missing and self.unknown == "error":
            raise UnknownWordError(
                f"words not in the vocabulary: {sorted(set(missing))} (in {text!r}); build the tokenizer "
                "from a corpus that contains them, or pass unknown='unk'"
            )
        return [self.stoi.get(w, self.unk_id) for w in words]

    def encode(self, texts: str | Iterable[str], truncate: bool = False) -> torch.Tensor:
        """Captions (a list, or one string) -> (B, context_length) long tensor
        ``<start> w_1 ... w_n <end> <pad> ...``. Over-long captions raise :class:`CaptionTooLongError`
        unless ``truncate``."""
        texts = _as_list(texts)
        rows = [self.tokenize(t) for t in texts]
        return _pack(rows, self.start_id, self.end_id, self.pad_id, self.context_length, truncate, texts)

    __call__ = encode

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        """(N,) ids -> the caption (words joined by spaces, no space before punctuation), read up to the
        first ``<end>``; (B, N) -> a list of captions. ``decode(encode(c))`` is ``c`` lower-cased with
        normalised spacing."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return [self.decode(row) for row in ids]
        out = ""
        for i in (int(i) for i in ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            word = self.itos[i]
            glue = "" if not out or (len(word) == 1 and not word.isalnum()) else " "
            out += glue + word
        return out


# ----------------------------------------------------------------------------------------------------
# CLIP's byte-level BPE

CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
CLIP_NUM_MERGES = 49152 - 256 - 2  # 48,894: 256 bytes + 256 end-of-word bytes + merges + 2 = 49,408


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to 256 printable unicode characters, so that BPE can
    work on strings without whitespace or control characters: bytes that are already printable
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves, the other 68 to ``chr(256 + k)`` in
    increasing order. Its order (printable bytes first) is also the order of the vocabulary's first
    256 entries."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


def default_bpe_path() -> Path:
    """The CLIP vocabulary ``bpe_simple_vocab_16e6.txt.gz`` shipped in the ``open_clip_torch`` wheel,
    found without importing ``open_clip`` (whose torchvision requirement may not be met)."""
    name = "bpe_simple_vocab_16e6.txt.gz"
    candidates: list[Path] = []
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / name for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
        candidates += [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == name]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary ({name}) was not found: it ships with the open_clip_torch wheel. Install it "
        "without its dependencies (its torchvision pin can clash with the installed torch): "
        "pip install --no-deps open_clip_torch   -- or pass the file's path to CLIPTokenizer(path)."
    )


def _fix_text(text: str) -> str:
    """``ftfy.fix_text(text)``, as CLIP and OpenCLIP run it (ftfy's default settings): it repairs
    mojibake (``"cafÃ©"`` -> ``"café"``), straightens curly quotes (so ``"it’s"`` splits like
    ``"it's"``), turns full-width letters and Latin ligatures into plain ones, drops control characters
    and normalises to NFC. There is no fallback without ftfy: any stand-in would give different ids
    on some real text, silently, so a missing ftfy raises ``ImportError``."""
    try:
        import ftfy
    except ImportError as e:
        raise ImportError(
            "CLIPTokenizer needs the 'ftfy' package to clean text as CLIP does (ftfy.fix_text, before "
            "the BPE); without it some captions would get different ids. Install it: pip install ftfy"
        ) from e
    return ftfy.fix_text(text)


def _clean(text: str) -> str:
    """CLIP's text normalisation, exactly as OpenCLIP's ``SimpleTokenizer`` (``clean="lower"``) and the
    original CLIP code do it: ``ftfy.fix_text`` (see :func:`_fix_text`), HTML entities unescaped twice
    (for doubly escaped text), ends stripped, runs of whitespace collapsed to one space, lower-cased.
    (transformers' fast CLIPTokenizer runs only NFC, whitespace and lower-casing, so it can differ on
    curly quotes, mojibake, full-width letters and HTML entities.)"""
    text = html.unescape(html.unescape(_fix_text(text)))
    return " ".join(text.split()).lower()


_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _is_letter(c: str) -> bool:  # unicode category L*  (\p{L})
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:  # unicode category N*  (\p{N})
    return unicodedata.category(c)[0] == "N"


def _pretokenize(text: str) -> list[str]:
    r"""Split cleaned text into the pieces BPE runs on, scanning left to right and taking at each
    position the first of these that matches (CLIP's pattern
    ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+``):
    a special token, an English contraction, a run of letters, a *single* digit, or a run of other
    non-space characters. Spaces separate pieces and are dropped."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        special = next((s for s in (CLIP_START, CLIP_END) if text.startswith(s, i)), None)
        contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
        if special or contraction:
            j = i + len(special or contraction)
        elif c.isspace():
            i += 1
            continue
        elif _is_letter(c):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(c):
            j = i + 1
        else:
            j = i + 1
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, read from the ``bpe_simple_vocab_16e6.txt.gz`` merges file.

    The vocabulary (49,408 entries, in id order): the 256 byte symbols of :func:`bytes_to_unicode`;
    the same 256 with the end-of-word marker ``</w>`` appended; one symbol per merge, for the first
    48,894 merges of the file in rank order; ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

    Encoding one caption: clean (:func:`_clean`), split into pieces (:func:`_pretokenize`), write each
    piece's UTF-8 bytes as byte symbols with ``</w>`` on the last, then repeatedly merge the adjacent
    pair of lowest rank until no ranked pair is left; each remaining symbol is one id.

    ``pad_token_id`` defaults to 49407 (``<|endoftext|>``), the padding of the openai/clip-vit-large-patch14
    tokenizer used with Stable Diffusion 1.x; OpenCLIP and Stable Diffusion 2 pad with 0.
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike,
        context_length: int = 77,
        pad_token_id: int | None = None,
        num_merges: int = CLIP_NUM_MERGES,
    ):
        _fix_text("")  # raises a clear ImportError now, rather than at the first caption, without ftfy
        path = Path(bpe_path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]  # line 0 is a version header
        if len(merges) != num_merges or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{path} does not hold {num_merges} merges of two symbols each; is it CLIP's BPE file?"
            )
        byte_symbols = list(bytes_to_unicode().values())
        vocab = [
            *byte_symbols,
            *(s + "</w>" for s in byte_symbols),
            *("".join(m) for m in merges),
            CLIP_START,
            CLIP_END,
        ]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {s: b for b, s in self.byte_encoder.items()}
        self.start_id = self.encoder[CLIP_START]
        self.end_id = self.encoder[CLIP_END]
        self.pad_id = self.end_id if pad_token_id is None else int(pad_token_id)
        if not 0 <= self.pad_id < len(vocab):
            raise ValueError(f"pad_token_id {self.pad_id} is outside the vocabulary (size {len(vocab)})")
        self.context_length = context_length
        self.path = path
        self._cache: dict[str, list[str]] = {CLIP_START: [CLIP_START], CLIP_END: [CLIP_END]}

    @classmethod
    def from_default(cls, **kwargs: object) -> CLIPTokenizer:
        """The tokenizer with the vocabulary of the installed ``open_clip_torch`` wheel (see
        :func:`default_bpe_path`; raises ``FileNotFoundError`` saying how to install it)."""
        return cls(default_bpe_path(), **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, piece: str) -> list[str]:
        """The BPE symbols of one piece (already written in byte symbols)."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            # the adjacent pair that was merged earliest in training
            pair = min(zip(word, word[1:]), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every (non-overlapping) occurrence, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def tokenize(self, text: str) -> list[int]:
        """The BPE ids of one caption, without start/end/padding."""
        ids = []
        for piece in _pretokenize(_clean(text)):
            symbols = (
                piece
                if piece in (CLIP_START, CLIP_END)
                else "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            )
            ids += [self.encoder[s] for s in self.bpe(symbols)]
        return ids

    def encode(
        self, texts: str | Iterable[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """Captions (a list, or one string) -> (B, context_length) long tensor
        ``[49406, tokens..., 49407, pad...]``. Over-long captions are cut to ``context_length - 2``
        tokens (the end token is kept) when ``truncate`` (the default, as in CLIP and Stable Diffusion),
        else raise :class:`CaptionTooLongError`."""
        texts = _as_list(texts)
        L = self.context_length if context_length is None else context_length
        rows = [self.tokenize(t) for t in texts]
        return _pack(rows, self.start_id, self.end_id, self.pad_id, L, truncate, texts)

    __call__ = encode

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        """(N,) ids -> text (cleaned and lower-cased, as it was encoded), read up to the first end
        token, start token dropped; (B, N) -> a list of texts."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return [self.decode(row) for row in ids]
        symbols = []
        for i in (int(i) for i in ids):
            if i not in self.decoder:
                raise ValueError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
            if i == self.end_id:
                break
            if i != self.start_id:
                symbols.append(self.decoder[i])
        words = "".join(symbols).split("</w>")  # the end-of-word marker becomes a space
        data = b" ".join(bytes(self.byte_decoder[c] for c in w) for w in words)
        return data.decode("utf-8", errors="replace").strip()
