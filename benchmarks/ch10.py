"""Chapter 10 (InstantID): the seams add nothing when off; identity similarity to one reference photo of a
held-out person (InstantID against IP-Adapter with CLIP at equal budget, beside the real ceiling and floor);
landmark error with and without IdentityNet; the caption's nuisances read back; IdentityNet's scale; the
identity encoder's verification accuracy; the fixed bars."""

from __future__ import annotations

from diffusion_core.experiments import instantid as claim
from diffusion_core.profiles import Profile
from diffusion_core.recipes import faces as FR

ROWS = ("instantid", "no_identitynet", "ip_clip", "base", "autoencoder_same_person", "real_same_person")


def metrics(profile: Profile, setting: claim.Setting | None = None) -> dict:
    """The chapter's numbers, all from ``diffusion_core.experiments.instantid``."""
    s = setting or claim.Setting(profile)
    zero = claim.identity_at_zero(profile, s)
    c = claim.identity_claim(profile, s, seed=profile.seed)
    sweep = claim.scale_sweep(profile, s, seed=profile.seed)
    nuis = [f"{k}_accuracy" for k in FR.NUISANCES]
    m = {
        "n": c["n"], "sampling_steps": c["sampling_steps"],
        "identity_equal_at_zero": zero["equal_at_zero"], "max_abs_diff_at_one": zero["max_abs_diff_at_one"],
        "identity_similarity_instantid": c["instantid"]["identity_similarity"],
        "identity_similarity_no_identitynet": c["no_identitynet"]["identity_similarity"],
        "identity_similarity_ip_clip": c["ip_clip"]["identity_similarity"],
        "identity_similarity_base": c["base"]["identity_similarity"],
        "identity_similarity_same_person_real": c["real_same_person"]["identity_similarity"],
        "identity_similarity_other_person_real": c["real_other_person"]["identity_similarity"],
        "landmark_error_instantid": c["instantid"]["landmark_error"],
        "landmark_error_no_identitynet": c["no_identitynet"]["landmark_error"],
        "landmark_error_ip_clip": c["ip_clip"]["landmark_error"],
        "landmark_error_base": c["base"]["landmark_error"],
        "landmark_error_real": c["real_same_person"]["landmark_error"],
        "identity_similarity_autoencoder": c["autoencoder_same_person"]["identity_similarity"],
        "landmark_error_autoencoder": c["autoencoder_same_person"]["landmark_error"],
        "verification_accuracy": s.encoder_metrics["verification_accuracy"],
        "judge_verification_accuracy": identity_judge_accuracy(profile),
        "chance": {k.removesuffix("_accuracy"): v for k, v in c["chance"].items()},
        "by_scale_identitynet": sweep,
        "parameters": claim.parameters(s),
        "train": {k: {q: v.metrics[q] for q in ("steps", "batch_size", "train_seconds", "parameters")}
                  for k, v in s.stored.items()},
        "identity_by_step": {k: v.metrics["identity_by_step"] for k, v in s.stored.items()},
        "seconds": c["seconds"],
    }
    for row in ROWS:
        m[f"nuisance_accuracy_{row}"] = {k.removesuffix("_accuracy"): c[row][k] for k in nuis}
    frac = claim.BARS["text_control_fraction"]   # the bar's value per nuisance: chance + frac (base - chance)
    m["text_control_bar"] = {k: m["chance"][k] + frac * (m["nuisance_accuracy_base"][k] - m["chance"][k])
                             for k in claim.TEXT_NUISANCES}
    m["autoencoder_psnr"] = dc_load(FR.FACES_VAE.name, profile).metrics["psnr"]
    m["verdicts"] = claim.verdicts({**m, "chance": m["chance"]})
    return m


def dc_load(name: str, profile: Profile):
    from diffusion_core.store import load
    return load(name, profile, verbose=False)


def identity_judge_accuracy(profile: Profile) -> float:
    from diffusion_core.evaluate.identity import identity_encoder
    return identity_encoder(profile, judge=True, verbose=False).metrics["verification_accuracy"]


def run(profile: Profile) -> dict:
    m = metrics(profile)
    print(f"adapter at lambda 0 and IdentityNet at 0 give the base's samples bit for bit: {m['identity_equal_at_zero']} "
          f"(at 1: max difference {m['max_abs_diff_at_one']:.3f})")
    print(f"{m['n']} held-out people, one reference photo each, {m['sampling_steps']} DDIM steps; judge cosine to the "
          "reference / landmark error (px) / nuisances read back (" + ", ".join(FR.NUISANCES) + "):")
    for row in ROWS:
        key = {"real_same_person": "same_person_real", "autoencoder_same_person": "autoencoder"}.get(row, row)
        ident = m[f"identity_similarity_{key}"]
        err = m[f"landmark_error_{'real' if row == 'real_same_person' else key}"]
        acc = m[f"nuisance_accuracy_{row}"]
        print(f"  {row:>18}: {ident:.3f} / {err:.2f} / " + ", ".join(f"{acc[k]:.2f}" for k in acc))
    print(f"  real other person: {m['identity_similarity_other_person_real']:.3f}; chance: "
          + ", ".join(f"{v:.2f}" for v in m["chance"].values()))
    print("IdentityNet scale (identity / landmark error): "
          + ", ".join(f"{k:g}: {v['identity_similarity']:.3f} / {v['landmark_error']:.2f}"
                      for k, v in m["by_scale_identitynet"].items()))
    print(f"identity encoder verification accuracy (held-out identities): {m['verification_accuracy']:.4f}, judge "
          f"{m['judge_verification_accuracy']:.4f}")
    print("parameters:", m["parameters"])
    print("training:", m["train"])
    print("identity over training (step, similarity, landmark error):", m["identity_by_step"])
    print("bars:", m["verdicts"])
    return {"metrics": m, "speed": {"sampling_seconds": m["seconds"]}}
