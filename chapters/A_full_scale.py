# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A · The full-scale models: the public checkpoints in the book's own classes
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/diffusion-from-the-papers/diffusion-from-the-papers/blob/main/chapters/A_full_scale.ipynb)
#
# **Papers.** Robin Rombach, Andreas Blattmann, Dominik Lorenz, Patrick Esser, Björn Ommer. *High-Resolution
# Image Synthesis with Latent Diffusion Models.* CVPR 2022. [arXiv:2112.10752](https://arxiv.org/abs/2112.10752).
# With the pieces of earlier chapters: DDIM (Song, Meng & Ermon 2021, chapter 03), CLIP (Radford et al. 2021,
# chapter 05), classifier-free guidance (Ho & Salimans 2022, chapter 06), ControlNet (Zhang, Rao & Agrawala
# 2023, chapter 07) and IP-Adapter (Ye et al. 2023, chapter 09).
#
# **What you will learn.**
# - That the classes of `diffusion_core`, which the chapters train at a toy scale, are the papers' models at
#   full size: built on PyTorch's `meta` device (no memory), each preset has exactly the parameter count of
#   the public checkpoint.
# - How Stable Diffusion 1.5 is put together: a text encoder, a UNet, an autoencoder, DDIM and
#   classifier-free guidance, in one short function you can read in full; and that it produces the same
#   latents as diffusers' `StableDiffusionPipeline` from the same weights and noise, with a ControlNet and an
#   IP-Adapter too.
# - How a model folder on disk (diffusers' or transformers' layout) becomes one of our modules, strictly.
# - Where a GPU and a network exist: images from the real Stable Diffusion 1.5 weights, sampled by our code.
#
# **Prerequisites.** Chapters 03 (DDIM), 04 (latent diffusion), 05 (CLIP), 06 (guidance); 07 and 09 for the
# ControlNet and IP-Adapter sections.
#
# **Run time.** `smoke` and `cpu` well under a minute (tiny random models only; nothing is trained). `gpu`:
# the last section downloads about 4 GB of weights and samples 512x512 images (a few minutes, not measured).

# %% [markdown]
# ## Setup

# %%
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # the package only: Colab's torch already meets its lower bound and is kept
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/diffusion-from-the-papers/diffusion-from-the-papers"], check=True)

# %%
import importlib.util
import inspect
import json
import tempfile
from pathlib import Path

import torch

import diffusion_core as dc
from diffusion_core import interop, pipelines, presets, viz
from diffusion_core.models import tokenizers
from diffusion_core.pipelines import StableDiffusion, text_to_image

profile = dc.setup()
# diffusers and transformers are the references (test dependencies): without them sections 2 and 3 are skipped
HAVE_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("diffusers", "transformers"))
if not HAVE_REFERENCE:
    print("diffusers or transformers is not installed: the comparisons of sections 2 and 3 will be skipped "
          "(they come with the package's test extra, diffusion-core[test])")

# %% [markdown]
# ## 1. Every preset at full size, counted against the public checkpoint
#
# `presets.build(name, device="meta")` builds the full-size configuration of a paper's model on PyTorch's
# `meta` device: every tensor has its shape and no storage, so even the 4.8-billion-parameter T5-XXL encoder
# costs nothing to build. Counting its parameters checks the architecture against the released checkpoint:
# one missing bias or a wrong width changes the count. The public counts below are constants, each with the
# file it was counted from.

# %%
# preset -> (public checkpoint, its parameter count). Counts of the released weight files (every tensor of
# the model's state dict, a tied embedding once); the Karlo prior's is diffusers' PriorTransformer built with
# that checkpoint's config.json and the Karlo decoder's diffusers' UNet2DConditionModel with the decoder
# configuration of diffusers' conversion script, both counted on the meta device.
PUBLIC = {
    "ddpm-cifar10": ("google/ddpm-cifar10-32", 35_746_307),
    "ddpm-256": ("google/ddpm-celebahq-256 (and the church, bedroom, cat 256 models)", 113_673_219),
    "sd15-unet": ("stable-diffusion-v1-5 unet/", 859_520_964),
    "sd15-vae": ("stable-diffusion-v1-5 vae/", 83_653_863),
    "clip-vit-l14-text": ("openai/clip-vit-large-patch14 text model = SD 1.5 text_encoder/", 123_060_480),
    "clip-vit-l14-vision": ("openai/clip-vit-large-patch14 vision model + projection", 303_966_208),
    "clip-vit-l14": ("openai/clip-vit-large-patch14 (CLIPModel)", 427_616_513),
    "controlnet-sd15": ("lllyasviel/sd-controlnet-canny (every SD 1.5 ControlNet v1.0)", 361_279_120),
    "t2i-adapter-sd15": ("TencentARC/t2iadapter_canny_sd15v2 (full adapter, diffusers T2IAdapter())", 77_369_280),
    "ip-adapter-sd15": ("h94/IP-Adapter models/ip-adapter_sd15", 22_319_616),
    "karlo-prior": ("kakaobrain/karlo-v1-alpha prior/", 1_022_030_080),
    "karlo-decoder": ("kakaobrain/karlo-v1-alpha decoder/ (diffusers' conversion script's DECODER_CONFIG)", 885_439_686),
    "if-stage1-xl": ("DeepFloyd/IF-I-XL-v1.0 unet/", 4_304_695_110),
    "t5-v1_1-xxl-encoder": ("google/t5-v1_1-xxl encoder (DeepFloyd IF text_encoder/)", 4_762_310_656),
}

rows = {}
print(f"{'preset':22s} {'ours':>15s} {'public':>15s}  checkpoint")
for name in [*PUBLIC, *(n for n in presets.names() if n not in PUBLIC)]:
    where, public = PUBLIC.get(name, ("(no public count recorded)", None))
    ours = presets.count_parameters(presets.build(name, device="meta")) if name in presets.PRESETS else None
    rows[name] = (ours, public)
    mark = "" if ours is None or public is None else ("  =" if ours == public else "  DIFFERS")
    print(f"{name:22s} {'not built yet' if ours is None else f'{ours:,}':>15s} "
          f"{'?' if public is None else f'{public:,}':>15s}  {where}{mark}")

# %%
# NBVAL_CHECK_OUTPUT
built = {n: r for n, r in rows.items() if r[0] is not None}
assert len(built) >= 11 and all(ours == public for ours, public in built.values()), built
assert all(n in PUBLIC for n in presets.names()), "a preset without a public count: add it to PUBLIC"

# %% [markdown]
# Every preset counts exactly the public checkpoint's parameters (a row would read "not built yet" for a
# public model whose preset the package lacked; none does). Stable Diffusion 1.5 itself is the sum of three of
# these rows: text encoder + UNet + autoencoder.

# %%
sd15_total = sum(rows[n][0] for n in ("clip-vit-l14-text", "sd15-unet", "sd15-vae"))
print(f"Stable Diffusion 1.5: {sd15_total:,} parameters, {sd15_total * 2 / 2**30:.2f} GiB in float16")

# %% [markdown]
# ## 2. Stable Diffusion 1.5 from our own classes
#
# Latent diffusion (Rombach et al. 2022) runs the diffusion of chapter 01 in the latent space of an
# autoencoder: an image $x$ of 512x512x3 is $z = \mathcal{E}(x)$ of 64x64x4, scaled to unit variance by
# 0.18215 (chapter 04). A UNet $\epsilon_\theta(z_t, t, c)$ cross-attends to the prompt's token states
# $c = \tau_\theta(y)$, the last layer of CLIP ViT-L/14's text tower (chapter 05). Sampling is DDIM
# (chapter 03) with classifier-free guidance (chapter 06) against a negative prompt $c_-$ (the empty
# prompt by default):
#
# $$\hat\epsilon = \epsilon_\theta(z_t, t, c_-) + s\,\big(\epsilon_\theta(z_t, t, c) - \epsilon_\theta(z_t, t, c_-)\big),$$
#
# both terms from one forward pass of the doubled batch $[c_-; c]$, and the image is $\mathcal{D}(z_0 /
# 0.18215)$. SD 1.5's scheduler is DDPM's 1000 steps with the "scaled linear" schedule ($\sqrt{\beta}$ from
# $\sqrt{0.00085}$ to $\sqrt{0.012}$); its K sampling steps are $t = 1 + i\lfloor 1000/K \rfloor$ ("leading"
# spacing with an offset of 1), and the last step lands on $\bar\alpha_0$, not on 1. Here is the whole
# sampler:

# %%
print(inspect.getsource(text_to_image))

# %% [markdown]
# Every line calls a class a chapter built: `encode_prompt` is the tokenizer and `CLIPTextModel`,
# `cfg_eps` is chapter 06's guidance, `sd.scheduler.sample` is chapter 03's DDIM update stepping through
# diffusers' timesteps (`schedulers.DDIMEquivalent`, built from a scheduler config by
# `pipelines.ddim_scheduler`), `sd.controlnet` is chapter 07's `ControlNet` and the IP-Adapter of chapter 09
# lives inside the UNet's cross-attention processors.
#
# **Checked against diffusers.** We build diffusers' `StableDiffusionPipeline` from tiny random models (a
# UNet of two levels, an autoencoder with f = 2, a two-layer CLIP text encoder with a tokenizer cut to the
# first 300 merges of CLIP's vocabulary), every weight moved off its initial value, convert each part with
# `interop.from_diffusers` / `from_transformers`, and sample both from the same latents $z_T$ with a
# negative prompt and $s = 5$.

# %%
def tiny_reference(seed: int = 0):
    """diffusers' pipeline on tiny random weights, and our parts converted from it."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    ours_tok = tokenizers.CLIPTokenizer(tokenizers.default_bpe_path(), context_length=16, num_merges=300)
    with tempfile.TemporaryDirectory() as folder:   # the same vocabulary and merges for transformers' tokenizer
        (Path(folder) / "vocab.json").write_text(json.dumps(ours_tok.encoder), encoding="utf-8")
        merges = sorted(ours_tok.bpe_ranks, key=ours_tok.bpe_ranks.get)
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges),
                                                 encoding="utf-8")
        theirs_tok = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=16)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=ours_tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, eos_token_id=ours_tok.end_id, pad_token_id=ours_tok.end_id))
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), unet=unet.eval(),
        tokenizer=theirs_tok,
        scheduler=diffusers.DDIMScheduler(**pipelines.SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sd = StableDiffusion(ours_tok, interop.from_transformers(text), interop.from_diffusers(unet).eval(),
                         interop.from_diffusers(vae).eval(), pipelines.ddim_scheduler(pipe.scheduler.config))
    return pipe, sd


PROMPTS, NEGATIVES = ["a red circle", "two blue squares"], ["blurry", "a green star"]
z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
if not HAVE_REFERENCE:
    print("skipped: diffusers and transformers are needed for the reference pipeline (the test extra)")
else:
    pipe, sd = tiny_reference()
    with torch.no_grad():
        ref_latents = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0,
                           latents=z_T.clone(), output_type="latent").images
        ref_images = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0,
                          latents=z_T.clone(), output_type="pt").images
    latents = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=5.0, latents=z_T, output="latent")
    images = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=5.0, latents=z_T)
    err_latents = ((latents - ref_latents).abs().max() / ref_latents.abs().max()).item()
    err_images = (pipelines.to_unit_range(images) - ref_images).abs().max().item()
    print(f"z_0: ours against diffusers, max |difference| / max |z_0| = {err_latents:.1e}")
    print(f"decoded images in [0, 1]: max |difference| = {err_images:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
if HAVE_REFERENCE:
    assert err_latents <= 1e-4 and err_images <= 1e-4, (err_latents, err_images)
    assert (ref_latents - z_T).abs().max() > 0.1   # the three steps did move the latents

# %% [markdown]
# The same on the ControlNet pipeline and with an IP-Adapter. A ControlNet copied from the tiny UNet (its
# zero convolutions moved off zero, so that it matters) reads a random condition image; an IP-Adapter in
# the official file layout is loaded into diffusers' UNet and, with `interop.load_ip_adapter`, into ours,
# with one random image embedding as the image prompt and another as the negative one.

# %%
if not HAVE_REFERENCE:
    print("skipped: diffusers and transformers are needed for the reference pipelines")
else:
    import diffusers

    pipe, sd = tiny_reference()
    net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    # an IP-Adapter in the official layout: an image projection and new keys/values per cross-attention layer
    layers = {i: pipe.unet.get_submodule(n.removesuffix(".processor")).to_k.out_features
              for i, n in enumerate(pipe.unet.attn_processors) if n.endswith("attn2.processor")}
    official = {"image_proj": {"proj.weight": 0.2 * torch.randn(4 * 32, 20, generator=g), "proj.bias": torch.zeros(128),
                               "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)},
                "ip_adapter": {f"{i}.to_{kv}_ip.weight": 0.2 * torch.randn(w, 32, generator=g)
                               for i, w in layers.items() for kv in "kv"}}
    pipe.unet._load_ip_adapter_weights([{k: dict(v) for k, v in official.items()}], low_cpu_mem_usage=False)
    interop.load_ip_adapter(sd.unet, official)
    sd.controlnet = interop.from_diffusers(net).eval()
    control = torch.rand(2, 3, 16, 16, generator=g)   # the condition image, in [0, 1] like diffusers'
    e, e_neg = torch.randn(1, 1, 20, generator=g), torch.randn(1, 1, 20, generator=g)
    cpipe = diffusers.StableDiffusionControlNetPipeline(**pipe.components, controlnet=net)
    cpipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = cpipe(PROMPTS, control, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=4.0,
                    latents=z_T.clone(), ip_adapter_image_embeds=[torch.cat([e_neg, e])], output_type="latent").images
    ours = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T, output="latent",
                         control_image=control, ip_adapter_image_embeds=[e], negative_ip_adapter_image_embeds=[e_neg])
    sd.controlnet = None
    without = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T, output="latent",
                            ip_adapter_image_embeds=[e], negative_ip_adapter_image_embeds=[e_neg])
    err_both = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"ControlNet + IP-Adapter: ours against diffusers, max |difference| / max |z_0| = {err_both:.1e}; "
          f"without the ControlNet z_0 moves by {(without - ours).abs().max():.2f}")

# %%
# NBVAL_CHECK_OUTPUT
if HAVE_REFERENCE:
    assert err_both <= 1e-4, err_both
    assert (without - ours).abs().max() > 1e-2

# %% [markdown]
# `tests/test_pipelines.py` runs these comparisons and more (guidance $s = 1$, stochastic DDIM with
# $\eta > 0$ from a shared generator, ControlNet alone, IP-Adapter alone, one image prompt per prompt) and
# checks that bad input (a negative prompt per prompt missing, latents of the wrong shape, a negative
# guidance scale, a ControlNet built for another UNet, image embeddings without an adapter) is an error that
# says what is wrong.

# %% [markdown]
# ## 3. Loading a model folder from disk
#
# A diffusers or transformers model folder holds a `config.json` and the weights (`*.safetensors`).
# `interop.load_pretrained(path)` reads which class the folder holds from its config (diffusers:
# `_class_name`, transformers: `architectures`), builds our module from that config and loads the weights
# into it, strictly, with neither diffusers nor transformers imported: a weight that is missing, unexpected
# or of the wrong shape is an error that names it, where the libraries themselves would leave a missing
# weight at random and only log it. A whole pipeline folder loads part by part with `subfolder=`;
# `StableDiffusion.from_pretrained` does that for the three parts, reads the scheduler's config into our
# DDIM and the tokenizer's files into our CLIP tokenizer. We save the tiny pipeline of section 2 with
# diffusers' `save_pretrained` (diffusers only writes the folder here) and load it back.

# %%
if not HAVE_REFERENCE:
    print("skipped: diffusers is needed here to write the folder that interop.load_pretrained then reads")
else:
    pipe, sd = tiny_reference()
    workdir = tempfile.TemporaryDirectory()
    saved = Path(workdir.name) / "tiny-sd"
    pipe.save_pretrained(saved)
    print(sorted(str(p.relative_to(saved)) for p in saved.rglob("*.*")))
    unet = interop.load_pretrained(saved, subfolder="unet")
    print(type(unet).__name__, f"{presets.count_parameters(unet):,} parameters, from {saved.name}/unet")
    loaded = StableDiffusion.from_pretrained(saved, tokenizer=sd.tokenizer)
    same = torch.equal(text_to_image(loaded, PROMPTS, steps=2, latents=z_T, output="latent"),
                       text_to_image(sd, PROMPTS, steps=2, latents=z_T, output="latent"))
    print("loaded from the folder, the same samples as the parts it was saved from:", same)
    # damage the UNet's weights: drop one tensor
    from safetensors.torch import load_file, save_file

    weights = saved / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k != "conv_out.bias"}, str(weights))
    try:
        interop.load_pretrained(saved, subfolder="unet")
    except interop.CheckpointMismatchError as err:
        print("a damaged folder:", str(err).replace(str(saved), "tiny-sd"))
    workdir.cleanup()

# %% [markdown]
# ## 4. The real Stable Diffusion 1.5 (where a GPU and a network exist)
#
# The same function on the released weights: `huggingface_hub` downloads the three parts (about 4 GB in
# float32) and the tokenizer's files, `StableDiffusion.from_pretrained` loads them into our classes (our
# CLIP tokenizer reads the folder's `merges.txt` and checks its `vocab.json`), and they run in float16 on
# the GPU. Elsewhere the cell says why it is skipped.

# %%
def network_available(host: str = "huggingface.co") -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"   # the maintained copy of runwayml/stable-diffusion-v1-5


def download_sd15() -> str | None:
    """The local folder of SD 1.5's text encoder, UNet, autoencoder, tokenizer and scheduler config
    (about 4 GB), or None with the reason printed."""
    if not torch.cuda.is_available():
        print("skipped: sampling the real SD 1.5 needs a GPU (about 3 GB of GPU memory in float16); none here")
        return None
    if not network_available():
        print(f"skipped: no network to download {REPO} from the Hugging Face Hub")
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(REPO, allow_patterns=[
            "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"])
    except Exception as err:  # the hub unreachable, the repository moved, a full disk: say so, do not fail the book
        print(f"skipped: downloading {REPO} failed ({type(err).__name__}: {err})")
        return None


folder = download_sd15()
if folder is not None:
    real = StableDiffusion.from_pretrained(folder)
    for part in (real.text_encoder, real.unet, real.vae):
        part.to("cuda", torch.float16).eval()
    prompts = ["a photograph of an astronaut riding a horse", "a watercolour painting of a lighthouse at dawn"]
    images = text_to_image(real, prompts, steps=30, guidance_scale=7.5, height=512, width=512,
                           generator=torch.Generator("cuda").manual_seed(0), progress=True)
    viz.show_images(images.float().cpu(), nrow=2, title="Stable Diffusion 1.5, sampled by diffusion_core")

# %% [markdown]
# ## Summary
# - Every full-size preset, built on the `meta` device, counts exactly the parameters of its public
#   checkpoint: the book's classes are the papers' models, only smaller in the chapters.
# - Stable Diffusion 1.5 is four parts and two ideas of earlier chapters: CLIP's text tower, the conditional
#   UNet, the KL autoencoder, the DDIM sampler, and classifier-free guidance in one batched forward pass. Put
#   together from our classes it gives diffusers' latents and images from the same weights and noise (here
#   to about 1e-6), with a ControlNet and an IP-Adapter as well.
# - A model folder from disk loads into our modules strictly, naming any weight that is missing or misshapen.
#
# ## Exercises
# 1. Count the parameters of SD 1.5's UNet by part (`conv_in`, `time_embedding`, each of `down_blocks`,
#    `mid_block`, `up_blocks`): where do the 860 million live? How much of it is attention?
# 2. Change `guidance_scale` to 1 and to 0 in section 2. Which agrees with diffusers, and why does the other
#    not? (Read the module docstring of `diffusion_core.pipelines`.)
# 3. Run `text_to_image` with `eta=1.0` and a generator. What does diffusers do to the noise so that the same
#    seed gives the same sample? (`tests/test_pipelines.py` checks it.)
# 4. With a GPU: sample the real model with 10, 20 and 50 DDIM steps from the same seed. When do the images
#    stop changing?
