"""Chapter 10's recipes and claims: the faces vocabulary covers every caption, the face set keeps what the
recipes need, the evaluator maps its outputs to pixels and rejects bad input, InstantID's seams add nothing
when turned off, IdentityNet reads the face tokens (not the caption), the recipes train only the new parts,
and the verdicts read the fixed bars."""

import itertools

import pytest
import torch

from diffusion_core.data.faces import BACKGROUNDS, EXPRESSIONS, LIGHTINGS, POSES, TILTS, caption, landmark_map
from diffusion_core.evaluate.faces import HEADS, FaceEvaluator
from diffusion_core.experiments import instantid as claim
from diffusion_core.recipes import faces as FR
from diffusion_core.recipes import instantid as R
from diffusion_core.recipes import latent as L

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_vocabulary_covers_every_caption_and_context_fits_the_longest():
    tok = FR.tokenizer()
    caps = [caption(*k) for k in itertools.product(range(len(POSES)), range(len(TILTS)), range(len(EXPRESSIONS)),
                                                   range(len(LIGHTINGS)), range(len(BACKGROUNDS)))]
    ids = tok.encode(caps)  # raises on an unknown word
    longest = max(len(c.split()) for c in caps)
    assert FR.context_length() == longest + 2
    # every caption ends with <end> inside the context (nothing truncated)
    assert ((ids == tok.end_id).sum(1) == 1).all()


@pytest.fixture(scope="module")
def profile():
    import diffusion_core as dc
    return dc.setup("smoke", verbose=False)


def test_face_set_keeps_images_captions_landmarks_and_their_maps(profile):
    data = FR.training_set(profile)
    n = len(data)
    assert data.pixels.shape == (n, 3, 32, 32) and data.pixels.dtype == torch.uint8
    assert len(data.captions) == n and data.landmarks.shape == (n, 5, 2)
    maps = data.condition("landmarks", slice(0, 4))
    assert torch.allclose(maps, landmark_map(data.landmarks[:4], 32), atol=1 / 255)
    held = set(FR.face_world(profile).heldout_identities.tolist())
    assert not held & set(data.identity.tolist())   # training identities only
    assert set(data.nuisances) == set(FR.NUISANCES)


def test_evaluator_maps_outputs_to_pixels_and_rejects_bad_input():
    torch.manual_seed(0)
    ev = FaceEvaluator(32, 16)
    with torch.no_grad():
        ev.landmarks.weight.zero_()
        ev.landmarks.bias.copy_(torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.5, -0.5, -0.5, 0.5]))
    marks, logits = ev(torch.zeros(2, 3, 32, 32))
    # u in [-1, 1] -> (u + 1) * R / 2 pixels
    assert torch.allclose(marks[0], torch.tensor([[0.0, 0.0], [32.0, 32.0], [16.0, 16.0], [24.0, 8.0], [8.0, 24.0]]))
    assert {k: v.shape[-1] for k, v in logits.items()} == HEADS
    err = ev.landmark_error(torch.zeros(2, 3, 32, 32), marks.detach())
    assert torch.allclose(err, torch.zeros(2), atol=1e-5)
    with pytest.raises(ValueError, match="takes \\(B, 3, 32, 32\\)"):
        ev(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="target landmarks must be"):
        ev.landmark_error(torch.zeros(2, 3, 32, 32), torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="unknown nuisances"):
        ev.nuisance_accuracy(torch.zeros(2, 3, 32, 32), {"hair": torch.zeros(2)})


@pytest.fixture(scope="module")
def parts(profile):
    stored, vae, diffusion = FR.load_base(profile)
    return stored.model, vae, diffusion


def _fresh(profile, kind):
    torch.manual_seed(1)
    m = R.build(R.RECIPES[kind].config(profile))
    with torch.no_grad():  # far from any special value (zero convolutions included), so equalities are not 0 = 0
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _prompts(profile, base, n=3):
    ref, target = R.reference_and_target(profile, n, seed=4)
    tok = FR.tokenizer()
    with torch.no_grad():
        ctx = base.encode_text(tok.encode(target.captions))
        null = base.encode_text(tok.encode([L.NULL_CAPTION]))
    return ref, target, ctx, null


def test_seams_off_give_the_base_bit_for_bit_and_on_change_it(profile, parts):
    base, vae, diffusion = parts
    ref, target, ctx, null = _prompts(profile, base)
    model = _fresh(profile, "instantid")
    e = torch.nn.functional.normalize(torch.randn(3, model.embed_dim), dim=-1)
    kw = {"steps": 3, "seed": 2, "profile": profile}
    plain = R.sample(base, diffusion, vae, ctx, null, **kw)
    off = R.sample(base, diffusion, vae, ctx, null, model, e, target.landmarks, ip_scale=0.0, identitynet_scale=0.0, **kw)
    assert torch.equal(plain, off)
    only_id = R.sample(base, diffusion, vae, ctx, null, model, e, target.landmarks, ip_scale=0.0, **kw)
    only_ip = R.sample(base, diffusion, vae, ctx, null, model, e, target.landmarks, identitynet_scale=0.0, **kw)
    assert not torch.equal(plain, only_id) and not torch.equal(plain, only_ip)
    # the landmarks matter to IdentityNet: other landmarks, another sample
    moved = R.sample(base, diffusion, vae, ctx, null, model, e, target.landmarks.roll(1, 0), ip_scale=0.0, **kw)
    assert not torch.equal(only_id, moved)
    # the base's weights are untouched by sampling with the adapter
    assert all(type(a.processor).__name__ == "AttnProcessor" for _, a in base.unet.cross_attentions())


def test_identitynet_reads_the_face_tokens_not_the_caption(profile, parts):
    base, _, _ = parts
    model = _fresh(profile, "instantid").eval()
    ref, target, ctx, _ = _prompts(profile, base)
    e = torch.nn.functional.normalize(torch.randn(3, model.embed_dim), dim=-1)
    eps = R.eps_fn(base, model)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    marks = landmark_map(target.landmarks, 32)
    with torch.no_grad(), R.joined(base, model, 0.0):   # the adapter's attention off: only IdentityNet sees e
        a = eps(x, t, {"context": ctx, "image": e, "landmarks": marks})
        b = eps(x, t, {"context": ctx, "image": e.roll(1, 0), "landmarks": marks})
        tokens = model.face_tokens(e)
        down, mid = model.identitynet(base.unet_input(x), t, tokens, marks, return_dict=False)
        by_hand = base(x, t, context=ctx, added_cond_kwargs={"image_embeds": [e[:, None, None]]},
                       down_block_additional_residuals=down, mid_block_additional_residual=mid).float()
    assert not torch.allclose(a, b)
    assert torch.allclose(a, by_hand, atol=1e-6)
    assert tokens.shape == (3, R.NUM_TOKENS, base.unet.config.cross_attention_dim)


def test_sample_rejects_bad_prompts(profile, parts):
    base, vae, diffusion = parts
    ref, target, ctx, null = _prompts(profile, base)
    model = _fresh(profile, "instantid")
    e = torch.randn(3, model.embed_dim)
    with pytest.raises(ValueError, match="embeds must be"):
        R.sample(base, diffusion, vae, ctx, null, model, None, steps=2, profile=profile)
    with pytest.raises(ValueError, match="embeds must be"):
        R.sample(base, diffusion, vae, ctx, null, model, e[:2], steps=2, profile=profile)
    with pytest.raises(ValueError, match="landmarks must be"):
        R.sample(base, diffusion, vae, ctx, null, model, e, torch.zeros(3, 1, 32, 32), steps=2, profile=profile)
    with pytest.raises(ValueError, match="kind must be one of"):
        R.recipe_name("photomaker")


def test_recipes_train_only_the_new_parts(profile, parts):
    base, _, _ = parts
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for kind in R.KINDS:
        stored = R.load_model(kind, profile, verbose=False)
        m = stored.metrics
        assert m["steps"] == R.budget(profile)["steps"] and len(m["identity_by_step"]) >= 2
        assert m["parameters"] == sum(p.numel() for p in stored.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    inst = R.load_model("instantid", profile, verbose=False).model
    assert isinstance(inst, R.InstantID)
    # IdentityNet is a trained copy of the base encoder: same shapes as the base's down blocks
    assert inst.identitynet.conv_in.weight.shape == base.unet.conv_in.weight.shape


def test_verdicts_read_the_bars():
    m = {"identity_similarity_instantid": 0.6, "identity_similarity_ip_clip": 0.4,
         "identity_similarity_other_person_real": 0.1, "landmark_error_instantid": 1.0,
         "landmark_error_no_identitynet": 2.0, "verification_accuracy": 0.95,
         "chance": {"expression": 0.5, "background": 0.125},
         "nuisance_accuracy_instantid": {"expression": 0.8, "background": 0.6},
         "nuisance_accuracy_base": {"expression": 0.9, "background": 0.9}}
    assert all(claim.verdicts(m).values())
    worse = {**m, "identity_similarity_instantid": 0.3, "landmark_error_instantid": 2.5, "verification_accuracy": 0.8,
             "nuisance_accuracy_instantid": {"expression": 0.6, "background": 0.6}}
    v = claim.verdicts(worse)
    assert not v["identity_over_ip_clip"] and v["identity_over_other_person"]
    assert not v["landmarks_better_with_identitynet"] and not v["verification_accuracy"]
    assert not v["text_still_controls"]   # expression 0.6 < 0.5 + 0.5 * (0.9 - 0.5)
