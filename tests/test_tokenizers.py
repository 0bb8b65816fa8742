"""Tokenizers: the shapes-world word tokenizer and CLIP's byte-level BPE."""

import html
import importlib.metadata
import importlib.util
import json

import pytest
import torch

from diffusion_core.models import tokenizers as tok
from diffusion_core.models.tokenizers import (
    CaptionTooLongError,
    CLIPTokenizer,
    UnknownWordError,
    WordTokenizer,
    bytes_to_unicode,
)

CAPTIONS = [
    "A red circle left of a blue square.",
    "a small green triangle, above a yellow circle",
    "Two blue squares!",
]

# ---------------------------------------------------------------- WordTokenizer


def test_word_tokenizer_from_corpus_is_deterministic():
    a = WordTokenizer.from_corpus(CAPTIONS)
    b = WordTokenizer.from_corpus(list(reversed(CAPTIONS)))
    assert a.itos == b.itos
    assert a.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert a.context_length == max(len(WordTokenizer.split(c)) for c in CAPTIONS) + 2


def test_word_tokenizer_encodes_with_start_end_and_padding():
    t = WordTokenizer.from_corpus(CAPTIONS, context_length=12)
    x = t.encode(CAPTIONS)
    assert x.shape == (3, 12) and x.dtype == torch.long
    assert (x[:, 0] == t.start_id).all()
    n = len(WordTokenizer.split(CAPTIONS[2]))  # "two blue squares !"
    assert x[2, n + 1] == t.end_id and (x[2, n + 2 :] == t.pad_id).all()
    assert int(x.max()) < t.vocab_size


def test_word_tokenizer_round_trips():
    t = WordTokenizer.from_corpus(CAPTIONS)
    assert t.decode(t.encode(CAPTIONS)) == [
        "a red circle left of a blue square.",
        "a small green triangle, above a yellow circle",
        "two blue squares!",
    ]
    assert t.decode(t.encode("A RED circle")[0]) == "a red circle"


def test_word_tokenizer_unknown_words_raise_or_map_to_unk():
    t = WordTokenizer.from_corpus(CAPTIONS)
    with pytest.raises(UnknownWordError, match="purple"):
        t.encode(["a purple circle"])
    t_unk = WordTokenizer.from_corpus(CAPTIONS, unknown="unk")
    x = t_unk.encode(["a purple circle"])
    assert x[0, 2] == t_unk.unk_id
    assert t_unk.decode(x[0]) == "a <unk> circle"


def test_word_tokenizer_over_long_caption():
    t = WordTokenizer.from_corpus(CAPTIONS, context_length=5)
    with pytest.raises(CaptionTooLongError, match="only 3 fit"):
        t.encode([CAPTIONS[0]])
    x = t.encode([CAPTIONS[0]], truncate=True)
    assert x[0].tolist() == [t.start_id, *t.tokenize(CAPTIONS[0])[:3], t.end_id]


@pytest.mark.parametrize(
    "vocab, match",
    [(["red", "red"], "duplicate"), (["<pad>", "red"], "special"), (["two words"], "single")],
)
def test_word_tokenizer_rejects_bad_vocabularies(vocab, match):
    with pytest.raises(ValueError, match=match):
        WordTokenizer(vocab, context_length=8)


def test_word_tokenizer_rejects_non_strings():
    t = WordTokenizer.from_corpus(CAPTIONS)
    with pytest.raises(TypeError, match="strings"):
        t.encode([1, 2])


# ---------------------------------------------------------------- CLIPTokenizer


@pytest.fixture(scope="module")
def clip_tok():
    try:
        path = tok.default_bpe_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return CLIPTokenizer(path)


def test_clip_known_ids(clip_tok):
    assert clip_tok.encode(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tok.tokenize("a photo of a dog") == [320, 1125, 539, 320, 1929]
    assert clip_tok.tokenize("the") == [518]
    assert clip_tok.tokenize("Hello   World") == [3306, 1002]
    assert clip_tok.tokenize("1234") == [272, 273, 274, 275]  # digits one at a time
    assert clip_tok.tokenize("don't") == [847, 713]
    assert clip_tok.vocab_size == 49408


def test_clip_pads_to_77_with_the_end_token_or_a_chosen_id(clip_tok):
    x = clip_tok.encode(["a photo of a cat", "dog"])
    assert x.shape == (2, 77) and x.dtype == torch.long
    assert (x[0, 6:] == 49407).all()
    t0 = CLIPTokenizer(clip_tok.path, pad_token_id=0)
    y = t0.encode("dog")
    assert y[0, :3].tolist() == [49406, 1929, 49407] and (y[0, 3:] == 0).all()


def test_clip_truncation_keeps_the_end_token(clip_tok):
    long = "a photo of a cat " * 30
    x = clip_tok.encode([long])
    assert x[0, 0] == 49406 and x[0, 76] == 49407
    assert x[0, 1:76].tolist() == clip_tok.tokenize(long)[:75]
    with pytest.raises(CaptionTooLongError, match="truncate=True"):
        clip_tok.encode([long], truncate=False)


def test_clip_round_trip_and_cleanup(clip_tok):
    assert clip_tok.decode(clip_tok.encode(["A  Photo\nof a CAT"])[0]) == "a photo of a cat"
    assert clip_tok.decode(clip_tok.encode(["naïve café 🙂 日本"])) == ["naïve café 🙂 日本"]
    assert clip_tok.tokenize("fish &amp; chips") == clip_tok.tokenize("fish & chips")


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)


def test_missing_vocabulary_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(tok.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tok.importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        CLIPTokenizer.from_default()
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPTokenizer("/nonexistent/bpe.txt.gz")


SENTENCES = [
    "a photo of a cat",
    "A painting of a fox sitting in a field at sunrise, trending on artstation",
    "It's 2021! Héllo wörld, naïve café 🙂 don't",
    "  multiple   spaces\tand\nnewlines ",
    "UPPER case and MiXeD CaSe",
    "we'll they've I'm you'd she'll it's",
    "'sam' said o'neil's friend",
    "emoji 🐱🐶🚀 and 日本語のテキスト",
    "numbers 3.14159 and 1,000,000 and ½ ² ⅷ",
    "punctuation!!! ??? ... ;-) (parens) [brackets] {braces}",
    "Ünïcödé Ελληνικά русский العربية",
    "hyphen-ated and under_score and slash/path and back\\slash",
    "$100 #hashtag @user 50% ~tilde `backtick` ^caret",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ",
    "e\u0301 combining accent and precomposed é",
    "non\u00a0breaking space and zero\u200bwidth",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a cat; a dog: a bird - a fish",
    "quotes \"double\" and 'single'",
    "tabs\t\tand\r\nwindows line ends",
    "a " + "very " * 80 + "long caption",
    "x" * 60,
    "",
    "Ω≈ç√∫˜µ≤≥÷",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "mañana, jalapeño, façade, coöperate",
    "ǅungla ǈ ǋ titlecase",
    "cafe\u0301 vs café",
    "a photo of a cat." * 3,
    "a.b,c!d?e",
]


def test_clip_tokenizer_matches_transformers(clip_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    (tmp_path / "vocab.json").write_text(json.dumps(clip_tok.encoder), encoding="utf-8")
    merges = sorted(clip_tok.bpe_ranks, key=clip_tok.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    # transformers' fast CLIPTokenizer does not run ftfy nor unescape HTML, as CLIP does (and we do;
    # tests/test_clip_tokenizer_reference.py checks that against open_clip): give it the text after
    # that step, so that this test compares the rest (whitespace, lower-casing, splitting, BPE)
    fixed = [html.unescape(html.unescape(tok._fix_text(s))) for s in SENTENCES]
    expected = theirs(fixed, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ours = clip_tok.encode(SENTENCES).tolist()
    for s, a, b in zip(SENTENCES, ours, expected, strict=True):
        assert a == b, f"differs on {s!r}"
