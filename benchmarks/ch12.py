"""Chapter 12 (unCLIP / DALL·E 2): the prior's image embedding against the text embedding used in its place
(cosine with the true image embedding of the caption's scene; caption accuracy and judge similarity of the decoded
samples, with the caption-only decoder and the true embedding beside them); variations of an image (what the
evaluator still finds, what the pixels change); the fixed bars."""

from __future__ import annotations

from diffusion_core.experiments import unclip as claim
from diffusion_core.profiles import Profile


def metrics(profile: Profile, setting: claim.Setting | None = None) -> dict:
    """The chapter's numbers, all from ``diffusion_core.experiments.unclip``."""
    s = setting or claim.Setting(profile)
    cos = claim.embedding_cosines(s)
    dec = claim.decoding_comparison(s)
    var = claim.variations(s)
    m = {"n": s.n, "prior_steps": s.prior_steps, "decoder_steps": s.steps,
         "prior_scale": claim.PRIOR_SCALE, "decoder_scale": claim.DECODER_SCALE,
         **claim.benchmark_metrics(cos, dec, var)}
    verdicts = m.pop("verdicts")
    m.update({
        "cosines": cos,
        "decoding": {arm: dec[arm] for arm in (*claim.ARMS, "real")},
        "variations": {k: v for k, v in var.items() if k != "images"},
        "train": {name: st.metrics for name, st in (("shapes-unclip-prior", s.prior),
                                                     ("shapes-unclip-decoder", s.decoder))},
        "sampling_seconds": dict(s.seconds),
        "verdicts": verdicts,
    })
    return m


def run(profile: Profile) -> dict:
    m = metrics(profile)
    c = m["cosines"]
    print(f"{m['n']} unseen captions; prior {m['prior_steps']} DDIM steps (s = {m['prior_scale']:g}), decoder "
          f"{m['decoder_steps']} DDIM steps (s = {m['decoder_scale']:g})")
    print(f"cosine with the true image embedding: prior {c['prior_cosine']:.3f} (other scenes {c['prior_other']:.3f}), "
          f"text embedding {c['text_embedding_cosine']:.3f} (other scenes {c['text_embedding_other']:.3f}); two "
          f"scenes' true embeddings {c['true_other']:.3f}; recall@1 prior {c['prior_recall_at_1']:.3f}, text "
          f"embedding {c['text_embedding_recall_at_1']:.3f}")
    print("decoded (caption accuracy / shape / color / size / position / judge cosine / CLIP cosine / FD):")
    for arm, r in m["decoding"].items():
        print(f"  {arm:15s} {r['caption_accuracy']:.3f} / {r['shape_accuracy']:.3f} / {r['color_accuracy']:.3f} / "
              f"{r['size_accuracy']:.3f} / {r['position_accuracy']:.3f} / {r['judge_similarity']:.3f} / "
              f"{r['clip_cosine']:.3f} / {r['fd']:.2f}")
    print("variations:", m["variations"])
    print("training:", m["train"])
    print("sampling seconds:", {k: round(v, 1) for k, v in m["sampling_seconds"].items()})
    print("bars:", m["verdicts"])
    return {"metrics": m, "speed": {"sampling_seconds": m["sampling_seconds"]}}
