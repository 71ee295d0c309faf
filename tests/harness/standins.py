"""Random-weight stand-ins for every weight file the example workflows (example_workflows/*.json)
load, under the names the workflows use (scripts/example_workflows/files.py: MODELS), as small as ComfyUI's model
detection allows.

Why: the real files (2-16 GB each) cannot be downloaded here, and the end-to-end tests must run
each workflow through ComfyUI's own loaders (CheckpointLoaderSimple, ImageOnlyCheckpointLoader,
UNETLoader, ControlNetLoader, DualCLIPLoader) and the pack's loaders. Every file is written as
ComfyUI's own checkpoint saver lays it out (``model.state_dict_for_saving``: LDM/SGM key names,
OpenCLIP text towers where the published files have them), fp16, with seeded random values.
Models are built with ComfyUI's own classes (weights uninitialised, then filled here), so the
layouts are the ones that version of ComfyUI reads.

What is reduced, and why it still loads as the named model:

- Diffusion UNets keep ``model_channels`` 320, ``context_dim``, linear/conv projections,
  ``adm_in_channels`` and (for SDXL and SVD) the exact ``transformer_depth`` list, because
  ``comfy.supported_models`` matches on those keys. Reduced: ``channel_mult`` (fewer wide
  levels), ``num_res_blocks``, output/middle transformer depths, which detection reads from the
  keys but no model class constrains.
  * SD1.5 (``v1-5-pruned-emaonly-fp16.safetensors``): channel_mult [1, 1], 1 res block per level,
    depth 1 everywhere: 7 input blocks, middle width 320 (the full model: 12 blocks, 1280).
  * SD2.1-base (``v2-1_512-ema-pruned.safetensors``): channel_mult [1, 1, 1, 1], 2 res blocks:
    all 12 input blocks kept, because ControlNet-XS runs in lock-step with each of them.
  * SDXL (``sd_xl_base_1.0.safetensors``): transformer_depth [0, 0, 2, 2, 10, 10] (required by
    detection), channel_mult [1, 2, 2] (640 wide, not 1280, at the deepest level: ControlNeXt's
    SDXL UNet deltas are recognised by their non-320 widths), output depths 1, middle 1.
  * SVD-XT 1.1 (``svd_xt_1_1.safetensors`` and the ControlNeXt-SVD-v2 UNet): channel_mult
    [1, 1, 1, 1] (320 everywhere), everything else as detection requires.
  * SD3.5 Large (``sd3.5_large.safetensors``): 2 joint blocks, hidden 128 (detection derives
    depth = hidden / 64), RMS q/k norm as Large; positional table 192 x 192 as published.
- Not reducible (fixed configs in ComfyUI, whatever the file holds): the VAEs (SD 83.7M
  parameters, SVD temporal decoder, SD3 16-channel), the text encoders (CLIP-L 123M, OpenCLIP
  ViT-H text 354M, OpenCLIP ViT-bigG text 695M) and SVD's CLIP ViT-H vision tower (632M):
  they are full size, which is most of the disk (about 7 GB in all) and of the load time.
  T5-XXL (4.7B) is not generated: the SD3.5 workflow uses DualCLIPLoader (CLIP-L + CLIP-G).
- Control files are built for the reduced bases: ControlNeXt modules keep the released key
  layout with ``mid_convs.1`` producing the reduced width at the injection point (320 for the
  SD1.5 middle block); ControlNeXt UNet weight files cover exactly the reduced UNet's attention
  outputs; ControlNet-XS files in the authors' formats (safetensors for SDXL, a .ckpt pickle for SD2.1)
  keep the released control widths (48m: 32/64/128 and learned time embedding; 14m: 4/8/16/16)
  with base-facing convolutions of the reduced base widths;
  stock ControlNets (SD1.5 v1.1 fp16 copies, SD3.5 Large Stability format) mirror the reduced UNet/MMDiT.
- Placeholders (example_workflows.files.PLACEHOLDERS): the Flux, Z-Image and Qwen-Image workflows'
  files are one-tensor files under their names, so the file lists and the workflows' validation
  see them; those workflows are not run (a Flux stand-in would need ComfyUI's full-size T5-XXL;
  core builds Z-Image and Qwen-Image at full width).
- Annotators: Depth Anything V2 Small full size (random); DWPose ONNX files are constant
  graphs with the real input/output names that report one person (a random YOLOX/RTMPose would
  detect nothing useful, and the real graphs are 350 MB).

Files are generated once into a cache folder keyed by this file's hash (``XCTRL_STANDIN_CACHE``,
default ``~/.cache/xctrl-nodes/standins``; ``XCTRL_STANDIN_DIR`` names a ready folder) in a
subprocess, then linked into each test server's
models folder. Run by hand: ``python tests/harness/standins.py /path/to/ComfyUI [out_dir]``.
"""
import contextlib
import hashlib
import inspect
import math
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts")
if SCRIPTS not in sys.path:  # the workflow catalogue (scripts/example_workflows)
    sys.path.insert(0, SCRIPTS)
from example_workflows.files import MODELS, PLACEHOLDERS  # noqa: E402

# folder -> file names: every model file of the workflows, plus the preprocessors' networks
FILES = {}
for _folder, _name in MODELS:
    FILES.setdefault(_folder, []).append(_name)
FILES["annotators"] = ["depth_anything_v2_vits.pth", "yolox_l.onnx", "dw-ll_ucoco_384.onnx"]

_UNET_COMMON = dict(
    in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32, use_checkpoint=False, model_channels=320,
)
SD15 = dict(_UNET_COMMON, channel_mult=[1, 1], num_res_blocks=[1, 1], transformer_depth=[1, 1],
            transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
            use_linear_in_transformer=False, adm_in_channels=None)
SD21 = dict(_UNET_COMMON, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1, context_dim=1024,
            use_linear_in_transformer=True, adm_in_channels=None)
SDXL = dict(_UNET_COMMON, channel_mult=[1, 2, 2], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1, context_dim=2048,
            use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")
SVD = dict(_UNET_COMMON, in_channels=8, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
           transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
           transformer_depth_middle=1, context_dim=1024, use_linear_in_transformer=True, adm_in_channels=768,
           num_classes="sequential", use_temporal_attention=True, use_temporal_resblock=True, extra_ff_mix_layer=True,
           use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
           disable_temporal_crossattention=False, max_ddpm_temb_period=10000)
SD35_DEPTH = 2  # joint blocks; hidden = 64 * depth
SD35 = dict(in_channels=16, out_channels=16, patch_size=2, depth=SD35_DEPTH, input_size=None, adm_in_channels=2048,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * SD35_DEPTH}},
            num_patches=192 * 192, pos_embed_max_size=192, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
            qk_norm="rms")


def cache_root():
    return os.environ.get("XCTRL_STANDIN_CACHE", os.path.expanduser("~/.cache/xctrl-nodes/standins"))


def _fingerprint():
    """Changes with this file and with the file names the workflows load."""
    with open(os.path.abspath(__file__), "rb") as f:
        code = f.read()
    return hashlib.sha256(code + repr(sorted(FILES.items())).encode()).hexdigest()[:16]


def ensure(comfy_root, timeout=1800):
    """Returns the folder holding every stand-in ({folder}/{file}), generating it on first use."""
    out = os.environ.get("XCTRL_STANDIN_DIR") or os.path.join(cache_root(), _fingerprint())
    if os.path.isfile(os.path.join(out, "COMPLETE")):
        return out
    env = dict(os.environ)
    subprocess.run([sys.executable, os.path.abspath(__file__), comfy_root, out], check=True, timeout=timeout, env=env)
    if not os.environ.get("XCTRL_STANDIN_DIR"):
        _remove_stale(out)
    return out


def _remove_stale(current):
    """Stand-ins of earlier versions of this file (8 GB each) are not kept."""
    root = os.path.dirname(current)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if path != current and os.path.isfile(os.path.join(path, "COMPLETE")):
            shutil.rmtree(path, ignore_errors=True)


def link_into(standin_dir, models_dir):
    """Symlinks every stand-in into a ComfyUI models folder (created as needed)."""
    for folder, names in FILES.items():
        os.makedirs(os.path.join(models_dir, folder), exist_ok=True)
        for name in names:
            dst = os.path.join(models_dir, folder, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)  # names with their source's subfolders
            if not os.path.lexists(dst):
                os.symlink(os.path.join(standin_dir, folder, name), dst)


@contextlib.contextmanager
def server(comfy_root, prepare=None):
    """A real ComfyUI server with every stand-in linked into its models folder and the
    workflows' input files in place; offline for annotator downloads. ``prepare(server)``
    runs before start (e.g. to add a corrupt file). Always stopped and cleaned up."""
    from .server import ComfyServer
    from . import workflow_runs

    old = os.environ.get("XCTRL_OFFLINE")
    os.environ["XCTRL_OFFLINE"] = "1"  # the annotators are there; never try the network
    srv = ComfyServer(comfy_root)
    link_into(ensure(comfy_root), srv.models_dir)
    workflow_runs.write_test_inputs(os.path.join(srv.base, "input"), comfy_root)
    if prepare is not None:
        prepare(srv)
    try:
        with srv:
            yield srv
    finally:
        if old is None:
            os.environ.pop("XCTRL_OFFLINE", None)
        else:
            os.environ["XCTRL_OFFLINE"] = old
        shutil.rmtree(srv.base, ignore_errors=True)


# ----------------------------------------------------------------------------- generation
# Everything below runs in the generating subprocess, with ComfyUI imported.

def _fill(sd, seed):
    """Seeded random values in place: fan-in scaled weights, unit norms, small biases."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name in sorted(sd):
        t = sd[name]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lname = name.lower()
        if t.ndim >= 2:
            if "embed" in lname and t.ndim == 2 and ("token" in lname or "position" in lname or "positional" in lname):
                std = 0.02
            else:
                std = 1.0 / math.sqrt(max(1, t[0].numel()))
            v = torch.randn(t.shape, generator=g) * std
        elif name.endswith("weight") and any(s in lname for s in ("norm", "ln_", "ln_final", "layer_norm", "gamma")):
            v = 1.0 + 0.05 * torch.randn(t.shape, generator=g)
        elif "mix_factor" in lname or "logit_scale" in lname:
            v = torch.zeros(t.shape)
        else:
            v = 0.02 * torch.randn(t.shape, generator=g)
        with torch.no_grad():
            t.copy_(v)
    return sd


def _materialise(module, seed, dtype=None):
    """Allocates real (zeroed) storage for a module built with uninitialised weights and fills it."""
    import torch

    sd = {k: torch.zeros(v.shape, dtype=dtype or v.dtype) for k, v in module.state_dict().items()}
    return _fill(sd, seed)


def _half(sd):
    import torch

    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _save(path, sd):
    import torch
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sd = _half(sd)
    if path.endswith(".safetensors"):
        save_file(sd, path)
    elif path.endswith(".ckpt"):
        torch.save({"state_dict": sd, "global_step": 0}, path)
    else:
        torch.save(sd, path)
    print(f"[standins] {os.path.basename(path)}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M parameters", flush=True)


def _model(config_cls, unet_config):
    import torch

    mc = config_cls(dict(unet_config))
    mc.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        model = mc.get_model({})
    return mc, model


def _unet_sd(model, seed):
    return _materialise(model.diffusion_model, seed, dtype=None)


def _clip_sd(mc, seed):
    """The text encoders of a model config, as ComfyUI's CLIP object names them."""
    import torch
    import comfy.sd

    target = mc.clip_target({})
    with torch.device("meta"):
        model = target.clip(dtype=torch.float16, device="meta")
    return _materialise(model, seed)


def _vae_sd(kind, seed):
    """A VAE of the kind ComfyUI builds from the keys that select it (sd, svd, sd3)."""
    import torch
    import comfy.sd

    z = 16 if kind == "sd3" else 4
    probe = {"decoder.conv_in.weight": torch.zeros(512, z, 3, 3),
             "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3)}
    if kind == "svd":
        probe["decoder.mid.block_1.mix_factor"] = torch.zeros(1)
    elif kind == "sd":
        probe["post_quant_conv.weight"] = torch.zeros(z, z, 1, 1)
        probe["quant_conv.weight"] = torch.zeros(2 * z, 2 * z, 1, 1)
    vae = comfy.sd.VAE(sd=probe)
    return _materialise(vae.first_stage_model, seed, dtype=torch.float32)


def _checkpoint(path, config_cls, unet_config, seed, clip=True, vae="sd", clip_vision=False):
    import torch
    import comfy.clip_vision

    mc, model = _model(config_cls, unet_config)
    unet = _unet_sd(model, seed)
    clip_sd = _clip_sd(mc, seed + 1) if clip else None
    vae_sd = _vae_sd(vae, seed + 2) if vae else None
    cv_sd = None
    if clip_vision:
        cfg = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
        with torch.device("meta"):
            cv = comfy.clip_vision.ClipVisionModel(cfg)
        cv_sd = _materialise(cv.model, seed + 3)
    # ComfyUI's own saver naming: prefixes and OpenCLIP conversion of the text towers. Newer
    # ComfyUI takes the UNet's state dict as an argument (its ModelPatcher passes it); older
    # ones read it from the model themselves.
    model.diffusion_model.load_state_dict(unet, assign=True)
    parts = dict(clip_state_dict=clip_sd, vae_state_dict=vae_sd, clip_vision_state_dict=cv_sd)
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        parts["unet_state_dict"] = model.diffusion_model.state_dict()
    sd = model.state_dict_for_saving(**parts)
    sd = {k: v for k, v in sd.items() if v.device.type != "meta"}
    _save(path, sd)
    return mc


def _unet_file_keys(unet_config, attn):
    """{diffusers name: ldm name} of the UNet's attention to_out.0 weights/biases."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)
    return {d: l for d, l in mapping.items() if f".{attn}.to_out.0." in d}


def _controlnext(path, layout, out_channels, seed):
    sys.path.insert(0, os.path.dirname(HERE))
    from harness.controlnext_files import controlnext_sd

    _save(path, controlnext_sd(layout, out_channels=out_channels, seed=seed))


def _controlnext_unet(path, mc, attns, seed, scale=1.0):
    import torch

    shapes = {}
    with torch.device("meta"):
        model = mc.get_model({})
    ldm = model.diffusion_model.state_dict()
    for attn in attns:
        for d, l in _unet_file_keys(mc.unet_config, attn).items():
            shapes[d] = tuple(ldm[l].shape)
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    _fill(sd, seed)
    _save(path, {k: v * scale for k, v in sd.items()})


def _xs(path, layout_file, base_channels, seed, diffusers=False):
    """A ControlNet-XS with the released control widths and base-facing widths of the reduced base,
    in the vislearn format, or renamed to diffusers' adapter format."""
    import dataclasses

    import torch

    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from harness.layouts import load_layout

    pack = _pack()
    keys = pack.import_module(".models.controlnet_xs_keys", pack.name)
    net = pack.import_module(".models.controlnet_xs", pack.name)
    layout = load_layout(layout_file)["keys"]
    with torch.device("meta"):
        released = {k: torch.empty(tuple(s)) for k, s in layout.items()}
    cfg = keys.read_config(released)
    cfg = dataclasses.replace(cfg, base_channels=tuple(base_channels))
    shapes = {k: tuple(v.shape) for k, v in net.ControlNetXS(cfg, device="meta").state_dict().items()}
    sd = _fill({k: torch.zeros(s) for k, s in shapes.items()}, seed)
    if diffusers:
        from harness.xs_reference import vislearn_to_diffusers

        n_in = len({k.split(".")[1] for k in sd if k.startswith("enc_zero_convs_in.")})
        sd = {vislearn_to_diffusers(k, n_in): v for k, v in sd.items()
              if k != "scale_list" and not k.startswith("control_model.label_emb.")}
    _save(path, sd)


def _pack():
    """The pack's pure modules under the package name ``xctrl``, as tests/conftest.py sets it up
    (without the top-level __init__ that registers ComfyUI nodes)."""
    import importlib
    import types

    if "xctrl" not in sys.modules:
        pkg = types.ModuleType("xctrl")
        pkg.__path__ = [os.path.dirname(os.path.dirname(HERE))]
        sys.modules["xctrl"] = pkg
    return types.SimpleNamespace(import_module=importlib.import_module, name="xctrl")


def _controlnet_sd15(path, mc, seed):
    import torch
    import comfy.cldm.cldm
    import comfy.ops

    cfg = dict(mc.unet_config)
    for k in ("out_channels", "dtype", "device", "operations"):
        cfg.pop(k, None)
    cfg["hint_channels"] = 3
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(**cfg, operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float16)
    sd = _materialise(net, seed)
    _save(path, {"control_model." + k: v for k, v in sd.items()})


def _controlnet_sd35(path, control_type, seed):
    """Stability's SD3.5 Large ControlNet format, for the reduced MMDiT (one block per joint block)."""
    import torch
    import comfy.cldm.dit_embedder
    import comfy.ops
    import comfy.utils

    with torch.device("meta"):
        net = comfy.cldm.dit_embedder.ControlNetEmbedder(
            img_size=None, patch_size=2, in_chans=16, num_layers=SD35_DEPTH, main_model_double=SD35_DEPTH,
            double_y_emb=False, attention_head_dim=64, num_attention_heads=SD35_DEPTH, adm_in_channels=2048,
            device="meta", dtype=torch.float16, operations=comfy.ops.disable_weight_init)
    sd = _materialise(net, seed)
    published = {entry[0]: entry[1] for entry in comfy.utils.MMDIT_MAP_BASIC}
    sd = {published.get(k, k): v for k, v in sd.items()}
    sd["control_type"] = torch.tensor(float(control_type))
    _save(path, sd)


def _text_encoder(path, which, seed):
    """clip_l.safetensors / clip_g.safetensors as published (transformers naming, no prefix)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import torch

    with torch.device("meta"):
        if which == "l":
            model = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        else:
            model = comfy.sdxl_clip.SDXLClipG(device="meta", dtype=torch.float16)
    sd = _materialise(model.transformer, seed)
    _save(path, sd)


def _annotators(out, seed):
    import torch

    pack = _pack()
    dav2 = pack.import_module(".preprocessors.depth_anything_v2", pack.name)
    torch.manual_seed(seed)
    net = dav2.DepthAnythingV2Small()
    with torch.no_grad():
        net.pretrained.pos_embed.normal_(0, 0.02)
    os.makedirs(os.path.join(out, "annotators"), exist_ok=True)
    torch.save(net.state_dict(), os.path.join(out, "annotators", "depth_anything_v2_vits.pth"))
    _dwpose_onnx(os.path.join(out, "annotators"))


def _constant_onnx(path, input_name, input_shape, outputs):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    import onnx

    nodes, outs, inits = [], [], []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name + "_value"))
        nodes.append(helper.make_node("Identity", [name + "_value"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(np.shape(value))))
    graph = helper.make_graph(nodes, "standin", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def _dwpose_onnx(folder):
    """yolox_l.onnx reporting one person box, dw-ll_ucoco_384.onnx a fixed whole-body pose.

    YOLOX raw output: (1, 8400, 85) = [cx, cy, w, h, objectness, 80 class scores] on the
    640 x 640 letterbox grid (strides 8/16/32, decoded by the pack). The exported graph ends in
    sigmoids, so objectness and class scores are probabilities: 0 everywhere but one anchor,
    whose box sits in the middle of the stride-32 grid (exactly one person per frame);
    RTMPose SimCC outputs put 133 keypoints on a loose figure."""
    import numpy as np

    raw = np.zeros((1, 8400, 85), np.float32)
    # the first stride-32 cell is index 8000 (80*80 + 40*40); grid 20 x 20
    gx, gy = 10, 10
    idx = 80 * 80 + 40 * 40 + gy * 20 + gx
    raw[0, idx, 0:2] = 0.0  # offsets within the cell
    raw[0, idx, 2:4] = np.log(np.array([200.0, 400.0]) / 32.0)
    raw[0, idx, 4] = 0.95
    raw[0, idx, 5] = 0.95  # class 0: person
    _constant_onnx(os.path.join(folder, "yolox_l.onnx"), "images", (1, 3, 640, 640), {"output": raw})
    k = 133
    sx = np.full((1, k, 288 * 2), -5.0, np.float32)
    sy = np.full((1, k, 384 * 2), -5.0, np.float32)
    rng = np.random.default_rng(0)
    for i in range(k):
        sx[0, i, int(rng.uniform(0.3, 0.7) * 576)] = 5.0
        sy[0, i, int(rng.uniform(0.1, 0.9) * 768)] = 5.0
    _constant_onnx(os.path.join(folder, "dw-ll_ucoco_384.onnx"), "input", (1, 3, 384, 288), {"simcc_x": sx, "simcc_y": sy})


def generate(comfy_root, out):
    import torch

    sys.path.insert(0, os.path.dirname(HERE))
    from harness import comfy_runtime

    comfy_runtime.import_comfyui(comfy_root)
    import comfy.supported_models as sm

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = out + ".partial"
    os.makedirs(tmp, exist_ok=True)
    p = lambda folder, name: os.path.join(tmp, folder, name)  # noqa: E731

    sd15 = _checkpoint(p("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"), sm.SD15, SD15, 10)
    _controlnext(p("controlnet", "controlnext_sd15_deepfashion_multiview_controlnet.safetensors"), "sd15", 320, 11)
    _controlnext_unet(p("controlnet", "controlnext_sd15_deepfashion_multiview_unet.safetensors"), sd15, ("attn1", "attn2"), 12)
    _controlnet_sd15(p("controlnet", "control_v11p_sd15_openpose_fp16.safetensors"), sd15, 13)
    _controlnet_sd15(p("controlnet", "control_v11p_sd15_canny_fp16.safetensors"), sd15, 14)

    _checkpoint(p("checkpoints", "v2-1_512-ema-pruned.safetensors"), sm.SD20, SD21, 20)
    _xs(p("controlnet", "sd21_encD_canny_14m.ckpt"), "controlnet_xs_vislearn_sd21_14m.json",
        [320 * m for m in SD21["channel_mult"]], 21)  # the authors' format: a pickle with state_dict

    sdxl = _checkpoint(p("checkpoints", "sd_xl_base_1.0.safetensors"), sm.SDXL, SDXL, 30)
    for i, name in enumerate(("anime_canny", "vidit_depth")):
        _controlnext(p("controlnet", f"controlnext_sdxl_{name}_controlnet.safetensors"), "sdxl", 320, 31 + i)
        _controlnext_unet(p("controlnet", f"controlnext_sdxl_{name}_unet.safetensors"), sdxl, ("attn2",), 33 + i, scale=0.01)
    _xs(p("controlnet", "sdxl_encD_depth_48m.safetensors"), "controlnet_xs_vislearn_sdxl_48m.json",
        [320 * m for m in SDXL["channel_mult"]], 35)

    _checkpoint(p("checkpoints", "svd_xt_1_1.safetensors"), sm.SVD_img2vid, SVD, 40, clip=False, vae="svd", clip_vision=True)
    mc, model = _model(sm.SVD_img2vid, SVD)
    _save(p("diffusion_models", "controlnext-svd_v2-unet-fp16_converted.safetensors"), _unet_sd(model, 41))
    _controlnext(p("controlnet", "controlnext-svd_v2-controlnet-fp16.safetensors"), "svd_v2", 320, 42)

    _checkpoint(p("checkpoints", "sd3.5_large.safetensors"), sm.SD3, SD35, 50, clip=False, vae="sd3")
    _controlnet_sd35(p("controlnet", "sd3.5_large_controlnet_canny.safetensors"), 1, 51)
    _controlnet_sd35(p("controlnet", "sd3.5_large_controlnet_depth.safetensors"), 2, 52)
    _text_encoder(p("text_encoders", "clip_l.safetensors"), "l", 53)
    _text_encoder(p("text_encoders", "clip_g.safetensors"), "g", 54)

    for folder, name in sorted(PLACEHOLDERS):  # listed, never loaded (see example_workflows.files.PLACEHOLDERS)
        _save(p(folder, name), {"placeholder": torch.zeros(1)})

    _annotators(tmp, 60)
    missing = [f"{d}/{n}" for d, names in FILES.items() for n in names if not os.path.isfile(p(d, n))]
    if missing:
        raise RuntimeError(f"stand-ins not generated: {missing}")
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write("ok\n")
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.rename(tmp, out)


if __name__ == "__main__":
    root = sys.argv[1]
    dest = sys.argv[2] if len(sys.argv) > 2 else os.path.join(cache_root(), _fingerprint())
    generate(root, dest)
