"""Asym: how far the part of the denoiser's Jacobian that a control adds is from symmetric,
estimated with random probes (MIControlNet's measure; the formula and its estimate:
models/conservativity.py, docs/conservativity.md), for a ControlNeXt or a stock UNet ControlNet
(a CONTROL_NET from core's Load ControlNet) on SD1.5 and SDXL MODELs. Both run one measurement
(``_measure``: noise, conditionings, the probe estimate); only the denoiser call with the control
injected differs, and each is the one training uses (runtime/controlnext.injection_options,
runtime/controlnet_training.controlled_forward)."""
import types

import torch

import comfy.model_management as mm

from ..models import conservativity as cons
from ..models import controlnext as cnx
from ..models import controlnext_training as tr
from . import batch_rows, controlnet_training, training
from .control_runner import image_size
from .controlnext import cross_norm_term, injection_options
from .controlnext_apply import check_width, variant_for
from .model_family import family_title, model_family

NODE = "ControlNeXt Jacobian Asymmetry (XCtrl)"
CONTROLNET_NODE = "ControlNet Jacobian Asymmetry (XCtrl)"
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


def _check_model(model, node, what):
    family = model_family(model)
    if family not in FAMILIES:
        raise ValueError(f"{node} measures {what} on SD1.5 and SDXL models; this MODEL is {family_title(family)}: "
                         "connect an SD1.5 or SDXL checkpoint's MODEL")
    return family


def _check_inputs(node, image, latent, probes):
    n = latent["samples"].shape[0]
    if image.shape[0] not in (1, n):
        raise ValueError(f"{node}: {image.shape[0]} images for {n} latents: give one image, or one per latent")
    if int(probes) < 1:
        raise ValueError(f"{node}: probes is {probes}: at least one probe is needed")
    for what, t in (("latents", latent["samples"]), ("images", image)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{node}: the {what} contain NaN or infinite values: fix the node that makes them")


def measure(model, controlnext, image, latent, positive, strength=1.0, timestep=500, probes=8, seed=0,
            probe="rademacher", sd15_layout="refuse"):
    """A ControlNeXt's Jacobian asymmetry on the latents noised to ``timestep`` (DDPM, noise from
    ``seed``), injected as Apply ControlNeXt does at that timestep."""
    family = _check_model(model, NODE, "ControlNeXt")
    variant = variant_for(controlnext, model, sd15_layout)
    check_width(controlnext, variant, model)
    _check_inputs(NODE, image, latent, probes)
    n = latent["samples"].shape[0]

    def controlled(device, image_hw, conds, sigmas):
        module = cnx.build_controlnext(controlnext.state_dict, variant).to(device=device, dtype=torch.float32).eval()
        hint = batch_rows.resize(batch_rows.image_to_nchw(image.clone()), image_hw).to(device).expand(n, -1, -1, -1)
        ctx, y = training.stack_contexts(conds)
        kw = {} if y is None else {"y": y.to(device)}
        dm = model.model.diffusion_model

        def forward(x, t, taps):
            with torch.no_grad():  # the feature does not depend on x
                feat = module(hint, cnx.control_timesteps(variant, sigmas[t].to(device), t.float().to(device)))
            scale = cnx.injection_scales(variant, strength, [False] * n, module.learned_scale()).to(device)
            term = cross_norm_term(variant, feat, scale)
            options = injection_options(variant, lambda h: training.joined_with(h, term(h), taps))
            return dm(x, t.float().to(device), context=ctx.to(device), transformer_options=options, **kw)

        return forward

    return _measure(model, family, latent, positive, timestep, probes, seed, probe, NODE, controlled)


def measure_controlnet(model, control_net, image, latent, positive, strength=1.0, timestep=500, probes=8, seed=0,
                       probe="rademacher"):
    """A stock UNet ControlNet's Jacobian asymmetry on the latents noised to ``timestep`` (DDPM,
    noise from ``seed``): its residuals times ``strength`` added where ComfyUI adds them (every
    skip connection and the middle), the hint fitted as Apply ControlNet fits it."""
    family = _check_model(model, CONTROLNET_NODE, "stock ControlNets")
    _check_inputs(CONTROLNET_NODE, image, latent, probes)
    if getattr(control_net, "global_average_pooling", False):
        raise ValueError(f"{CONTROLNET_NODE}: this control_net is a shuffle ControlNet (its residuals are averaged over "
                         "the image, global average pooling): not measured here; connect another ControlNet")
    fix = f"connect a ControlNet made for {family_title(family)} (Load ControlNet Model)"
    with torch.inference_mode(False):
        net = controlnet_training.controlnet_copy(model, control_net, "this control_net", CONTROLNET_NODE, fix)
    net.requires_grad_(False)  # only d/dx is taken
    n = latent["samples"].shape[0]
    images = image if image.shape[0] == n else image.expand(n, -1, -1, -1)

    def controlled(device, image_hw, conds, sigmas):
        rows = types.SimpleNamespace(images=images, image_hw=image_hw, conds=conds, empty=None)
        net.to(device).eval()
        forward = controlnet_training.controlled_forward(rows, model, net, device, strength, "sum", torch.float32)
        idx, conditional = torch.arange(n), torch.zeros(n, dtype=torch.bool)
        return lambda x, t, taps: forward(x, t.to(device), idx, conditional, taps)

    return _measure(model, family, latent, positive, timestep, probes, seed, probe, CONTROLNET_NODE, controlled)


def _measure(model, family, latent, positive, timestep, probes, seed, probe, node, controlled):
    """The measurement both controls share. ``controlled(device, image_hw, conds, sigmas)`` returns
    ``forward(x, t, taps)``: the denoiser's output on ``x`` with the control injected, the
    activation(s) after it joined and its term(s) put in ``taps`` ("joined", "term": one tensor or
    one list per injection point; conservativity.control_jacobian_t takes either)."""
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        x0 = latent["samples"].float().clone()
        n, image_hw = x0.shape[0], image_size(model.model, x0)
        conds = training.conditionings(positive, n, model, family, image_hw, "positive conditioning", node=node)
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=g)
        mm.load_models_gpu([model], force_full_load=True)
        device, dm = model.load_device, model.model.diffusion_model
        sigmas = model.model.model_sampling.sigmas.float()
        t = torch.full((n,), int(timestep), dtype=torch.long)
        with training.trainable_unet(dm, [], device), training.math_attention():
            forward = controlled(device, image_hw, conds, sigmas)
            x = tr.noised(x0, noise, t, 1.0 / (sigmas ** 2 + 1.0)).to(device).requires_grad_(True)
            taps = {}
            out = forward(x, t, taps)
            jt = cons.control_jacobian_t(out, taps["joined"], taps["term"], x)
            asym, frob = cons.hutchinson_asymmetry(jt, cons.probe_vectors(tuple(out.shape), probes, probe, g))
    return Asymmetry(asym, frob, int(timestep), int(probes))
