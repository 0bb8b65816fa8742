"""Chapter 13 (Imagen): the three findings in miniature. Caption accuracy on captions, training paraphrases and
held-out paraphrases for the frozen language model, the frozen CLIP text tower and a scratch encoder; the cascade's
FD with and without noise conditioning augmentation, over the sampling-time level; no clipping, static clipping and
dynamic thresholding over the guidance weight (FD, caption accuracy, saturated values); the fixed bars."""

from __future__ import annotations

from diffusion_core.experiments import imagen as claim
from diffusion_core.profiles import Profile


def metrics(profile: Profile, setting: claim.Setting | None = None) -> dict:
    """The chapter's numbers, all from ``diffusion_core.experiments.imagen``."""
    s = setting or claim.Setting(profile)
    enc = claim.encoder_comparison(profile, s)
    cas = claim.cascade(profile, s)
    thr = claim.thresholding_sweep(profile, s)
    m = {"n": s.n, "sampling_steps": s.steps, **claim.benchmark_metrics(enc, cas, thr)}
    verdicts = m.pop("verdicts")
    m.update({
        "encoder_scores": {claim.ENCODER_KEYS[e]: enc[e] for e in s.bases},
        "real_base_resolution": enc["real"],
        "cascade": {k: cas[k] for k in ("no_aug", "bicubic", "real_low_aug", "real_low_no_aug", "real")},
        "caption_accuracy_by_aug_level": {a: r["caption_accuracy"] for a, r in cas["aug"].items()},
        "caption_accuracy_cascade_no_aug": cas["no_aug"]["caption_accuracy"],
        "real_thresholding": thr["real"],
        "alpha_bar_T": thr["alpha_bar_T"], "x0_error_gain_first_step": thr["x0_error_gain_first_step"],
        "train": {name: st.metrics for name, st in [*((f"shapes-imagen-{e}", b) for e, b in s.bases.items()),
                                                    ("shapes-imagen-sr", s.sr), ("shapes-imagen-sr-noaug", s.sr_noaug)]},
        "sampling_seconds": dict(s.seconds),
        "verdicts": verdicts,
    })
    return m


def run(profile: Profile) -> dict:
    m = metrics(profile)
    print(f"{m['n']} unseen one-object scenes, {m['sampling_steps']} respaced ancestral steps, w = "
          f"{claim.ENCODER_SCALE:g} ({claim.ENCODER_THRESHOLD}) for findings 1 and 2")
    print("1. caption accuracy by encoder (captions / training paraphrases / held-out paraphrases; retrieval of the "
          "held-out paraphrase):")
    for k in m["caption_accuracy_by_encoder"]:
        print(f"  {k:9s} {m['caption_accuracy_by_encoder'][k]:.3f} / "
              f"{m['training_paraphrase_accuracy_by_encoder'].get(k, float('nan')):.3f} / "
              f"{m['paraphrase_accuracy_by_encoder'][k]:.3f}; retrieval {m['paraphrase_retrieval_by_encoder'][k]:.3f}")
    print(f"  real 16 px scenes: {m['real_base_resolution']['caption_accuracy']:.3f}, FD {m['real_base_resolution']['fd']:.2f}")
    c = m["cascade"]
    print(f"2. cascade FD: no augmentation {m['fd_cascade_no_aug']:.2f}; with augmentation by level "
          + ", ".join(f"{a:g}: {v:.2f}" for a, v in m["fd_by_aug_level"].items())
          + f"; bicubic {c['bicubic']['fd']:.2f}; from real 16 px: aug {c['real_low_aug']['fd']:.2f}, "
            f"no aug {c['real_low_no_aug']['fd']:.2f}; real 32 px {c['real']['fd']:.2f}")
    print("3. thresholding (w: FD / caption accuracy / saturated):")
    for meth in m["fd_by_w"]:
        print(f"  {meth:8s} " + ", ".join(
            f"{w:g}: {m['fd_by_w'][meth][w]:.2f} / {m['caption_accuracy_by_w'][meth][w]:.3f} / "
            f"{m['saturated_fraction_by_w'][meth][w]:.3f}" for w in m["fd_by_w"][meth]))
    print(f"  real scenes: saturated {m['real_thresholding']['saturated']:.3f}; alpha_bar_T {m['alpha_bar_T']:.3g}: the first "
          f"step multiplies an error in eps_hat by {m['x0_error_gain_first_step']:,.0f} in x0_hat")
    print("training:", m["train"])
    print("sampling seconds:", {k: round(v, 1) for k, v in m["sampling_seconds"].items()})
    print("bars:", m["verdicts"])
    return {"metrics": m, "speed": {"sampling_seconds": m["sampling_seconds"]}}
