"""unCLIP's diffusion prior (chapter 12): the same weights give diffusers' ``PriorTransformer`` outputs
(max relative error <= 1e-5) on small configurations with every parameter perturbed and a padded
text mask; a saved folder loads through ``interop.load_pretrained``; the causal mask and the padding
mask do what they say; bad inputs and unsupported options are errors that name them."""

import pytest
import torch
from parity_utils import perturb, rel_error

from diffusion_core.models.prior import PriorConfig, PriorTransformer, PriorTransformerOutput

TOL = 1e-5

# small configurations of diffusers' PriorTransformer (diffusers' keys)
CONFIGS = {
    # Karlo's layout: text tokens, text embedding, time, noised embedding, query token
    "karlo": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=5,
                  additional_embeddings=4),
    # Kandinsky-style widths: embeddings wider than the transformer, three heads, three layers
    "wide": dict(num_attention_heads=3, attention_head_dim=4, num_layers=3, embedding_dim=20, num_embeddings=6,
                 additional_embeddings=4),
    # every switch on: LayerNorms on the input and the text embedding, GELU time MLP, own widths
    "switches": dict(num_attention_heads=2, attention_head_dim=6, num_layers=2, embedding_dim=10, num_embeddings=4,
                     additional_embeddings=4, time_embed_act_fn="gelu", norm_in_type="layer",
                     embedding_proj_norm_type="layer", time_embed_dim=24, embedding_proj_dim=14, clip_embed_dim=9),
}


def _inputs(cfg: dict, batch: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    m, d = cfg["num_embeddings"], cfg["embedding_dim"]
    mask = torch.ones(batch, m, dtype=torch.bool)
    mask[0, m - 2:] = False  # padding at the end, as CLIP's tokenizer pads
    mask[1, 2:] = False
    return dict(hidden_states=torch.randn(batch, d, generator=g), timestep=torch.tensor([3, 250, 999])[:batch],
                proj_embedding=torch.randn(batch, cfg.get("embedding_proj_dim") or d, generator=g),
                encoder_hidden_states=torch.randn(batch, m, d, generator=g), attention_mask=mask)


def _theirs(cfg: dict, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.PriorTransformer(**cfg).eval()
    perturb(model, seed)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_prior_with_a_padding_mask(name):
    from diffusion_core.interop import from_diffusers

    cfg = CONFIGS[name]
    theirs = _theirs(cfg)
    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, PriorTransformer)
    inputs = _inputs(cfg)
    with torch.no_grad():
        want = theirs(**inputs).predicted_image_embedding
        got = ours(**inputs)
    assert isinstance(got, PriorTransformerOutput)
    assert got.predicted_image_embedding.shape == want.shape == (3, cfg.get("clip_embed_dim") or cfg["embedding_dim"])
    assert rel_error(want, got.predicted_image_embedding) <= TOL
    # without a mask (diffusers then applies none), with a python-int timestep, as a tuple
    inputs.pop("attention_mask")
    inputs["timestep"] = 17
    with torch.no_grad():
        want = theirs(**inputs).predicted_image_embedding
        (got,) = ours(**inputs, return_dict=False)
    assert rel_error(want, got) <= TOL
    # the embedding statistics: post_process_latents as diffusers'
    z = torch.randn(3, want.shape[-1])
    assert torch.allclose(theirs.post_process_latents(z), ours.post_process_latents(z), atol=1e-6)
    assert torch.allclose(ours.pre_process_latents(ours.post_process_latents(z)), z, atol=1e-5)


def test_matches_diffusers_without_text_tokens_or_query_token():
    """Shap-E's layout: no text tokens, no query token, several noised tokens and positions only for them."""
    from diffusion_core.interop import from_diffusers

    cfg = dict(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=6, num_embeddings=3,
               additional_embeddings=0, encoder_hid_proj_type=None, added_emb_type=None, norm_in_type="layer",
               embedding_proj_norm_type="layer", time_embed_act_fn="gelu", embedding_proj_dim=5, clip_embed_dim=7)
    theirs = _theirs(cfg, seed=3)
    ours = from_diffusers(theirs).eval()
    g = torch.Generator().manual_seed(1)
    x, z_t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 5, generator=g)
    with torch.no_grad():
        want = theirs(x, timestep=torch.tensor(40), proj_embedding=z_t).predicted_image_embedding
        got = ours(x, timestep=torch.tensor(40), proj_embedding=z_t).predicted_image_embedding
    assert got.shape == want.shape == (2, 3, 7)
    assert rel_error(want, got) <= TOL


def test_saved_folder_loads_with_load_pretrained(tmp_path):
    from diffusion_core.interop import load_pretrained

    cfg = CONFIGS["karlo"]
    theirs = _theirs(cfg, seed=5)
    theirs.save_pretrained(tmp_path / "prior")
    ours = load_pretrained(tmp_path, subfolder="prior")
    assert isinstance(ours, PriorTransformer) and not ours.training
    inputs = _inputs(cfg, seed=2)
    with torch.no_grad():
        assert rel_error(theirs(**inputs).predicted_image_embedding, ours(**inputs).predicted_image_embedding) <= TOL


def test_config_from_a_karlo_style_dict_and_refusals_name_the_key():
    # Karlo's saved config.json carries only the early keys; the rest take diffusers' defaults
    cfg = PriorConfig.from_diffusers({"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0.dev0",
                                      "num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20,
                                      "embedding_dim": 768, "num_embeddings": 77, "additional_embeddings": 4,
                                      "dropout": 0.0})
    assert cfg == PriorConfig.karlo()
    for key, value in (("time_embed_act_fn", "mish"), ("norm_in_type", "group"), ("added_emb_type", "dot"),
                       ("encoder_hid_proj_type", "mlp"), ("embedding_proj_norm_type", "rms")):
        with pytest.raises(ValueError, match=key):
            PriorConfig.from_diffusers({key: value})
    with pytest.raises(ValueError, match="some_new_switch"):
        PriorConfig.from_diffusers({"some_new_switch": True})


def _tiny(**overrides) -> PriorTransformer:
    torch.manual_seed(0)
    return PriorTransformer(PriorConfig.tiny(**overrides)).eval()


def test_the_prediction_sees_the_text_but_not_padded_tokens():
    model = _tiny()
    inputs = _inputs(CONFIGS["karlo"])
    with torch.no_grad():
        base = model(**inputs).predicted_image_embedding
        changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
        changed["encoder_hidden_states"][0, -1] += 5.0  # a padded token of row 0
        changed["encoder_hidden_states"][2, -1] += 5.0  # a real token of row 2
        out = model(**changed).predicted_image_embedding
    assert torch.allclose(out[0], base[0], atol=1e-6), "a padded text token must not change the prediction"
    assert not torch.allclose(out[2], base[2], atol=1e-4), "a real text token must change it"
    assert torch.allclose(out[1], base[1])


def test_the_causal_mask_hides_the_query_token_from_earlier_slots():
    """With the mask, slot k attends to slots <= k only: the query token (last) reads everything, and
    changing it changes nothing but its own output. Without a mask (diffusers' behaviour) nothing is
    masked, so the other slots see it too."""
    model = _tiny()
    inputs = _inputs(CONFIGS["karlo"])
    seen = {}
    hook = model.norm_out.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o.detach().clone()))
    with torch.no_grad():
        model(**inputs)
        before = seen["h"]
        model.prd_embedding.add_(torch.randn_like(model.prd_embedding))  # not a constant: LayerNorm removes one
        model(**inputs)
        after = seen["h"]
        unmasked = dict(inputs, attention_mask=None)
        model(**unmasked)
        before_unmasked = seen["h"]
        model.prd_embedding.add_(torch.randn_like(model.prd_embedding))
        model(**unmasked)
        after_unmasked = seen["h"]
    hook.remove()
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6)
    assert not torch.allclose(before[:, -1], after[:, -1], atol=1e-4)
    assert not torch.allclose(before_unmasked[:, 0], after_unmasked[:, 0], atol=1e-4)


def test_a_scalar_timestep_broadcasts_over_the_batch():
    model = _tiny()
    inputs = _inputs(CONFIGS["karlo"])
    inputs["timestep"] = torch.tensor(10)
    with torch.no_grad():
        out = model(**inputs).predicted_image_embedding
        per_row = model(**dict(inputs, timestep=torch.full((3,), 10))).predicted_image_embedding
    assert torch.equal(out, per_row)


@pytest.mark.parametrize("change, match", [
    (dict(hidden_states=torch.randn(3, 11)), "hidden_states .* width 12"),
    (dict(proj_embedding=torch.randn(3, 7)), "proj_embedding .* width 12"),
    (dict(proj_embedding=torch.randn(2, 12)), "proj_embedding has batch 2"),
    (dict(encoder_hidden_states=torch.randn(3, 5, 9)), r"encoder_hidden_states must be \(B, M, embedding_dim\)"),
    (dict(encoder_hidden_states=None), "needs encoder_hidden_states"),
    (dict(encoder_hidden_states=torch.randn(3, 4, 12), attention_mask=torch.ones(3, 4, dtype=torch.bool)),
     "positional embedding has 9"),
    (dict(attention_mask=torch.ones(3, 4, dtype=torch.bool)), r"attention_mask must be \(B, M\) = \(3, 5\)"),
    (dict(attention_mask=torch.ones(3, 1, 5, dtype=torch.bool)), "attention_mask must be"),
    (dict(attention_mask=[[1] * 5] * 3), r"attention_mask must be .* got list"),
    (dict(timestep=torch.tensor([1, 2])), "timestep must be"),
])
def test_bad_inputs_name_the_problem(change, match):
    model = _tiny()
    with pytest.raises(ValueError, match=match):
        model(**{**_inputs(CONFIGS["karlo"]), **change})


def test_a_prior_without_text_tokens_refuses_them_and_a_mask():
    model = _tiny(encoder_hid_proj_type=None, num_embeddings=0)
    x = torch.randn(2, 12)
    out = model(x, 5, torch.randn(2, 12)).predicted_image_embedding
    assert out.shape == (2, 12)
    with pytest.raises(ValueError, match="no text tokens"):
        model(x, 5, torch.randn(2, 12), encoder_hidden_states=torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="attention_mask covers the text tokens"):
        model(x, 5, torch.randn(2, 12), attention_mask=torch.ones(2, 5))


def test_config_checks_name_the_key():
    with pytest.raises(ValueError, match="num_layers"):
        PriorConfig.tiny(num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        PriorConfig.tiny(dropout=1.5)
    with pytest.raises(TypeError, match="not both"):
        PriorTransformer(PriorConfig.tiny(), num_layers=3)
