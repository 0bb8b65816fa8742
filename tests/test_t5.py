"""Our T5 encoder equals transformers' T5EncoderModel: small configs, every weight perturbed, padding
masks; and the relative position buckets, RMS norm and config checks on their own."""

import pytest
import torch
from parity_utils import perturb, rel_error

from diffusion_core.interop import CheckpointMismatchError
from diffusion_core.models import t5

TOL = 1e-5

CASES = [
    # d_model, d_kv, d_ff, layers, heads, buckets, max_distance, feed_forward_proj
    (32, 8, 48, 2, 4, 8, 16, "gated-gelu"),
    (48, 16, 64, 3, 2, 32, 128, "gated-gelu"),  # d_kv * heads != d_model
    (32, 8, 40, 2, 4, 16, 20, "relu"),  # T5 v1.0's feed-forward
]


def hf_model(d_model, d_kv, d_ff, layers, heads, buckets, max_distance, ff, seed):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.T5Config(vocab_size=97, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                                num_heads=heads, relative_attention_num_buckets=buckets,
                                relative_attention_max_distance=max_distance, feed_forward_proj=ff)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(cfg).eval()
    perturb(model, seed, scale=0.2)
    return model


def ids_and_mask(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, N - 5:] = 0  # padding at the end, as a tokenizer pads
    mask[2, 3:] = 0
    return ids * mask, mask  # pad id 0 where masked


@pytest.mark.parametrize("case", CASES)
def test_encoder_matches_transformers_with_padding(case):
    theirs = hf_model(*case, seed=len(case[-1]) + case[0])
    ours = t5.t5_encoder_from_transformers(theirs)
    assert ours.config.feed_forward_proj == case[-1]
    assert not ours.training
    ids, mask = ids_and_mask(3, 40, seed=case[0])  # 40 > max_distance 16, 20: the far, logarithmic buckets
    with torch.no_grad():
        for m in (mask, None):
            a = theirs(input_ids=ids, attention_mask=m, output_hidden_states=True)
            b = ours(ids, attention_mask=m, output_hidden_states=True)
            assert rel_error(a.last_hidden_state, b.last_hidden_state) <= TOL
            assert len(b.hidden_states) == len(a.hidden_states) == case[3] + 1
            for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
                assert rel_error(x, y) <= TOL
    # the mask matters: the real tokens of row 0 change when its padding is attended to
    with torch.no_grad():
        assert not torch.allclose(ours(ids, mask).last_hidden_state[0, :35], ours(ids).last_hidden_state[0, :35])


def test_from_transformers_dispatches_to_t5_and_keys_round_trip():
    from diffusion_core.interop import from_transformers

    theirs = hf_model(*CASES[0], seed=3)
    ours = from_transformers(theirs)
    assert isinstance(ours, t5.T5EncoderModel)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # only block 0 owns the relative position table
    names = [k for k in ours.state_dict() if "relative_attention_bias" in k]
    assert names == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert ours.encoder.embed_tokens is ours.shared
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_theirs


def test_relative_position_bucket_formula():
    # 32 buckets, max distance 128: 16 per direction, 8 exact (|r| < 8), then logarithmic up to 15
    r = torch.tensor([0, 1, 7, 8, 12, 16, 127, 128, 1000, -1, -7, -8, -1000])
    b = t5.relative_position_bucket(r, 32, 128)
    # |r| >= 8: 8 + floor(log(|r|/8) / log(16) * 8); r > 0 adds 16
    expected = [0, 16 + 1, 16 + 7, 16 + 8, 16 + 9, 16 + 10, 16 + 15, 16 + 15, 16 + 15, 1, 7, 8, 15]
    assert b.tolist() == expected
    all_r = torch.arange(-300, 301)
    b = t5.relative_position_bucket(all_r, 32, 128)
    assert b.min() == 0 and b.max() == 31
    assert (b[all_r > 0] >= 16).all() and (b[all_r <= 0] < 16).all()
    assert (b[all_r <= 0].flip(0).diff() >= 0).all()  # monotone in |r|


def test_relative_position_bucket_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    r = torch.arange(-200, 201)[None, :] - torch.arange(0, 5)[:, None]
    for buckets, dist in ((32, 128), (8, 16), (16, 20)):
        ref = T5Attention._relative_position_bucket(r, bidirectional=True, num_buckets=buckets, max_distance=dist)
        assert torch.equal(t5.relative_position_bucket(r, buckets, dist), ref)


def test_rms_norm_has_no_mean_subtraction_and_no_bias():
    norm = t5.RMSNorm(4, eps=0.0)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, -2.0, 2.0, -2.0], [3.0, 3.0, 3.0, 3.0]])
    y = norm(x)
    assert torch.allclose(y, x / x.pow(2).mean(-1, keepdim=True).sqrt())
    assert torch.allclose(y[0], torch.ones(4))  # a constant vector is not centred to 0 (LayerNorm would)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_unsupported_feed_forward_is_a_value_error_naming_the_key():
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        t5.T5Config.tiny(feed_forward_proj="gated-silu")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config.from_dict({"d_model": 32, "feed_forward_proj": "swish"})


def test_config_from_dict_reads_a_transformers_config():
    cfg = t5.T5Config.from_dict({"architectures": ["T5EncoderModel"], "d_model": 4096, "d_ff": 10240,
                                 "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
                                 "feed_forward_proj": "gated-gelu", "model_type": "t5"})
    assert cfg == t5.T5Config.v1_1_xxl()


def test_bad_input_is_a_clear_error():
    model = t5.T5EncoderModel(t5.T5Config.tiny())
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_state_dict_with_one_of_the_tied_embeddings_loads_and_a_missing_key_is_named():
    model = t5.T5EncoderModel(t5.T5Config.tiny())
    sd = model.state_dict()
    fresh = t5.T5EncoderModel(t5.T5Config.tiny())
    one = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}  # as safetensors stores it
    t5.load_t5_state_dict(fresh, one)
    assert torch.equal(fresh.encoder.embed_tokens.weight, sd["shared.weight"])
    broken = dict(sd)
    del broken["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        t5.load_t5_state_dict(fresh, broken)
    differing = dict(sd)
    differing["encoder.embed_tokens.weight"] = sd["shared.weight"] + 1
    with pytest.raises(CheckpointMismatchError, match="tied"):
        t5.load_t5_state_dict(fresh, differing)


def test_saved_transformers_folder_loads_through_interop_and_its_safetensors_directly(tmp_path):
    from safetensors.torch import load_file

    from diffusion_core.interop import load_pretrained

    theirs = hf_model(*CASES[0], seed=7)
    theirs.save_pretrained(tmp_path)
    ids, mask = ids_and_mask(3, 12, seed=7)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = load_pretrained(tmp_path)
        assert isinstance(ours, t5.T5EncoderModel)
        assert rel_error(expected, ours(ids, mask).last_hidden_state) <= TOL
        # the file stores the tied embedding once; our loader fills in its other name
        direct = t5.load_t5_state_dict(t5.T5EncoderModel(ours.config), load_file(tmp_path / "model.safetensors"))
        assert rel_error(expected, direct.eval()(ids, mask).last_hidden_state) <= TOL
