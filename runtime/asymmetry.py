"""Asym: how far the part of the denoiser's Jacobian that a ControlNeXt control adds is from
symmetric, estimated with random probes (MIControlNet's measure; the formula and its estimate:
models/conservativity.py, docs/conservativity.md). SD1.5 and SDXL MODELs."""
import torch

import comfy.model_management as mm

from ..models import conservativity as cons
from ..models import controlnext as cnx
from ..models import controlnext_training as tr
from . import batch_rows, training
from .control_runner import image_size
from .controlnext import cross_norm_term, injection_options
from .controlnext_apply import check_width, variant_for
from .model_family import family_title, model_family

NODE = "ControlNeXt Jacobian Asymmetry (XCtrl)"
PROBES = cons.PROBES
FAMILIES = ("sd15", "sdxl")


class Asymmetry:
    """Per latent: ``asym`` (estimate of 1/2 ||J_c - J_c^T||_F^2) and ``frobenius`` (of ||J_c||_F^2)."""

    def __init__(self, asym, frobenius, timestep, probes):
        self.asym, self.frobenius = asym.detach().float().cpu(), frobenius.detach().float().cpu()
        self.timestep, self.probes = timestep, probes

    @property
    def mean(self):
        return float(self.asym.mean())

    @property
    def relative(self):
        """Asym over ||J_c||_F^2: 0 for a symmetric J_c, at most 2 (J_c antisymmetric)."""
        frob = float(self.frobenius.mean())
        return self.mean / frob if frob > 0 else 0.0

    def report(self):
        rows = ", ".join(f"{float(a):.6g}" for a in self.asym)
        return (f"Asym (1/2 ||J_c - J_c^T||_F^2, J_c = the Jacobian the control adds) at timestep {self.timestep}, "
                f"{self.probes} probe(s) per latent: {self.mean:.6g} (per latent: {rows}); ||J_c||_F^2 {float(self.frobenius.mean()):.6g}; "
                f"relative {self.relative:.6g}")


def _checks(model, controlnext, image, latent, probes, sd15_layout):
    family = model_family(model)
    if family not in FAMILIES:
        raise ValueError(f"{NODE} measures ControlNeXt on SD1.5 and SDXL models; this MODEL is {family_title(family)}")
    variant = variant_for(controlnext, model, sd15_layout)
    check_width(controlnext, variant, model)
    n = latent["samples"].shape[0]
    if image.shape[0] not in (1, n):
        raise ValueError(f"{NODE}: {image.shape[0]} images for {n} latents: give one image, or one per latent")
    if int(probes) < 1:
        raise ValueError(f"{NODE}: probes is {probes}: at least one probe is needed")
    for what, t in (("latents", latent["samples"]), ("images", image)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{NODE}: the {what} contain NaN or infinite values: fix the node that makes them")
    return family, variant


def measure(model, controlnext, image, latent, positive, strength=1.0, timestep=500, probes=8, seed=0,
            probe="rademacher", sd15_layout="refuse"):
    """The control's Jacobian asymmetry on the latents noised to ``timestep`` (DDPM, noise from ``seed``)."""
    family, variant = _checks(model, controlnext, image, latent, probes, sd15_layout)
    x0 = latent["samples"].float().clone()
    n, image_hw = x0.shape[0], image_size(model.model, x0)
    ctx, y = training.stack_contexts(training.conditionings(positive, n, model, family, image_hw, "positive conditioning",
                                                            node=NODE))
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=g)
    mm.load_models_gpu([model], force_full_load=True)
    device, dm = model.load_device, model.model.diffusion_model
    sigmas = model.model.model_sampling.sigmas.float()
    t = torch.full((n,), int(timestep), dtype=torch.long)
    module = cnx.build_controlnext(controlnext.state_dict, variant).to(device=device, dtype=torch.float32).eval()
    hint = batch_rows.resize(batch_rows.image_to_nchw(image.clone()), image_hw).to(device).expand(n, -1, -1, -1)
    with torch.inference_mode(False), torch.enable_grad(), training.trainable_unet(dm, [], device), training.math_attention():
        x = tr.noised(x0, noise, t, 1.0 / (sigmas ** 2 + 1.0)).to(device).requires_grad_(True)
        with torch.no_grad():  # the feature does not depend on x
            feat = module(hint, cnx.control_timesteps(variant, sigmas[t].to(device), t.float().to(device)))
        scale = cnx.injection_scales(variant, strength, [False] * n, module.learned_scale()).to(device)
        term, taps = cross_norm_term(variant, feat, scale), {}
        options = injection_options(variant, lambda h: training.joined_with(h, term(h), taps))
        kw = {} if y is None else {"y": y.to(device)}
        out = dm(x, t.float().to(device), context=ctx.to(device), transformer_options=options, **kw)
        jt = cons.control_jacobian_t(out, taps["joined"], taps["term"], x)
        asym, frob = cons.hutchinson_asymmetry(jt, cons.probe_vectors(tuple(out.shape), probes, probe, g))
    return Asymmetry(asym, frob, int(timestep), int(probes))
