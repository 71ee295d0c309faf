"""The example workflows (example_workflows/*.json) written from API-format descriptions, so that
the UI files and the prompts the tests run never drift apart.

``WORKFLOWS`` describes each graph in API terms: node id -> (class_type, inputs, title), where an
input is a widget value or a link ``[node_id, output_slot]``; widgets left out get the node's
default. ``to_ui`` turns one into the frontend's "Workflow JSON 0.4" using the server's
``/object_info`` (widgets_values in input order, the hidden "control_after_generate" value after
seed widgets, the upload widget's value after LoadImage's file, a left-to-right layout by
dependency depth, the links array, each loader's ``models`` property from ``MODELS`` so the
frontend's missing-models dialog offers the downloads, and a view that shows the whole graph
inside the visible canvas); ``to_api`` is the inverse, the conversion the frontend makes
when it queues a prompt (virtual nodes such as Note are dropped).

Regenerate after a node's inputs change (the workflows test fails until then)::

    python tests/harness/workflow_builder.py /path/to/ComfyUI
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(os.path.dirname(HERE))
# ComfyUI serves a pack's example_workflows/ as templates; the 0.8.0 frontend shows each file
# name as the template's title and description, so the names are written as titles.
WORKFLOW_DIR = os.path.join(PACK_DIR, "example_workflows")
# The stock nodes' definitions the committed workflows were written from (written with them): the
# drift test rebuilds the files from these on every ComfyUI, whose own stock nodes may differ.
STOCK_DEFINITIONS = os.path.join(PACK_DIR, "tests", "data", "stock_node_definitions.json")

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
SEED_NAMES = ("seed", "noise_seed")

IMAGE = "example.png"  # ships in ComfyUI/input/
POSE_VIDEO = "pose_video.mp4"  # the user's driving video, in ComfyUI/input/
TRAINING_FOLDER = "controlnext_training"  # ComfyUI/input/<this>: training images with captions (name.png + name.txt)
NEGATIVE = "lowres, blurry, bad anatomy, extra limbs, watermark, text"

HF = "https://huggingface.co"
PBIHAO = f"{HF}/Pbihao/ControlNeXt/resolve/main"
# Every model file a workflow loads: (models folder, name as the loader lists it) -> download URL.
# Files published under a generic name (controlnet.safetensors) keep their source repository's
# folders, so they land apart and need no renaming; ComfyUI lists them with those folders.
MODELS = {
    ("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"):
        f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    ("checkpoints", "v2-1_512-ema-pruned.safetensors"):
        f"{HF}/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors",
    ("checkpoints", "sd_xl_base_1.0.safetensors"):
        f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    ("checkpoints", "svd_xt_1_1.safetensors"):
        f"{HF}/stabilityai/stable-video-diffusion-img2vid-xt-1-1/resolve/main/svd_xt_1_1.safetensors",
    ("checkpoints", "sd3.5_large.safetensors"):
        f"{HF}/stabilityai/stable-diffusion-3.5-large/resolve/main/sd3.5_large.safetensors",
    ("diffusion_models", "controlnext-svd_v2-unet-fp16_converted.safetensors"):
        f"{HF}/Kijai/ControlNeXt-SVD-V2-Comfy/resolve/main/controlnext-svd_v2-unet-fp16_converted.safetensors",
    ("text_encoders", "clip_l.safetensors"): f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    ("text_encoders", "clip_g.safetensors"):
        f"{HF}/stabilityai/stable-diffusion-3.5-large/resolve/main/text_encoders/clip_g.safetensors",
    ("controlnet", "ControlNeXt-SD1.5/deepfashion_multiview/controlnet.safetensors"):
        f"{PBIHAO}/ControlNeXt-SD1.5/deepfashion_multiview/controlnet.safetensors",
    ("controlnet", "ControlNeXt-SD1.5/deepfashion_multiview/unet.safetensors"):
        f"{PBIHAO}/ControlNeXt-SD1.5/deepfashion_multiview/unet.safetensors",
    ("controlnet", "ControlAny-SDXL/anime_canny/controlnet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/anime_canny/controlnet.safetensors",
    ("controlnet", "ControlAny-SDXL/anime_canny/unet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/anime_canny/unet.safetensors",
    ("controlnet", "ControlAny-SDXL/vidit_depth/controlnet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/vidit_depth/controlnet.safetensors",
    ("controlnet", "ControlAny-SDXL/vidit_depth/unet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/vidit_depth/unet.safetensors",
    ("controlnet", "controlnext-svd_v2-controlnet-fp16.safetensors"):
        f"{HF}/Kijai/ControlNeXt-SVD-V2-Comfy/resolve/main/controlnext-svd_v2-controlnet-fp16.safetensors",
    ("controlnet", "sdxl_encD_depth_48m.safetensors"): f"{HF}/CVL-Heidelberg/ControlNet-XS/resolve/main/sdxl_encD_depth_48m.safetensors",
    ("controlnet", "Testing-ConrolNetXS-SD2.1-canny/diffusion_pytorch_model.safetensors"):
        f"{HF}/UmerHA/Testing-ConrolNetXS-SD2.1-canny/resolve/main/diffusion_pytorch_model.safetensors",
    ("controlnet", "control_v11p_sd15_openpose_fp16.safetensors"):
        f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/control_v11p_sd15_openpose_fp16.safetensors",
    ("controlnet", "control_v11p_sd15_canny_fp16.safetensors"):
        f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/control_v11p_sd15_canny_fp16.safetensors",
    ("controlnet", "sd3.5_large_controlnet_canny.safetensors"):
        f"{HF}/Comfy-Org/stable-diffusion-3.5-controlnets_ComfyUI_repackaged/resolve/main/split_files/controlnet/sd3.5_large_controlnet_canny.safetensors",
    ("controlnet", "sd3.5_large_controlnet_depth.safetensors"):
        f"{HF}/Comfy-Org/stable-diffusion-3.5-controlnets_ComfyUI_repackaged/resolve/main/split_files/controlnet/sd3.5_large_controlnet_depth.safetensors",
    ("diffusion_models", "flux1-dev.safetensors"): f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
    ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"):
        f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors",
    ("vae", "ae.safetensors"): f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
    ("controlnet", "flux-canny-controlnet-v3.safetensors"):
        f"{HF}/XLabs-AI/flux-controlnet-collections/resolve/main/flux-canny-controlnet-v3.safetensors",
    ("controlnet", "flux-depth-controlnet-v3.safetensors"):
        f"{HF}/XLabs-AI/flux-controlnet-collections/resolve/main/flux-depth-controlnet-v3.safetensors",
    ("diffusion_models", "z_image_turbo_bf16.safetensors"):
        f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16.safetensors",
    ("text_encoders", "qwen_3_4b.safetensors"):
        f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
    ("model_patches", "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"):
        f"{HF}/alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union/resolve/main/Z-Image-Turbo-Fun-Controlnet-Union.safetensors",
    ("diffusion_models", "qwen_image_2512_fp8_e4m3fn.safetensors"):
        f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_2512_fp8_e4m3fn.safetensors",
    ("text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors"):
        f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    ("vae", "qwen_image_vae.safetensors"):
        f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors",
    ("model_patches", "qwen_image_canny_diffsynth_controlnet.safetensors"):
        f"{HF}/Comfy-Org/Qwen-Image-DiffSynth-ControlNets/resolve/main/split_files/model_patches/qwen_image_canny_diffsynth_controlnet.safetensors",
    ("model_patches", "qwen_image_depth_diffsynth_controlnet.safetensors"):
        f"{HF}/Comfy-Org/Qwen-Image-DiffSynth-ControlNets/resolve/main/split_files/model_patches/qwen_image_depth_diffsynth_controlnet.safetensors",
}
# Files the tests can only list, not load: a stand-in of Flux needs ComfyUI's fixed T5-XXL (4.7B
# parameters), more than this machine holds next to everything else. The workflow that uses them
# is validated and opened in the browser, not run (MI on Flux is tested on a tiny Flux).
PLACEHOLDERS = {("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
                ("vae", "ae.safetensors"), ("controlnet", "flux-canny-controlnet-v3.safetensors"),
                ("controlnet", "flux-depth-controlnet-v3.safetensors")}
# Z-Image / Qwen-Image: core's loaders fix the real widths (3840 / 3072) of the models and their
# control patches, so stand-ins would be full size; those are tested on tiny models built with the
# same classes (test_model_patch_mi.py).
PLACEHOLDERS |= {key for key in MODELS if key[1].startswith(("z_image", "qwen_", "Z-Image"))}
MODEL_FOLDER = {name: folder for folder, name in MODELS}


def source_repo(url):
    """owner/name of a Hugging Face download URL."""
    return "/".join(url[len(HF) + 1:].split("/")[:2])


# The view a workflow opens with shows the whole graph inside the part of the canvas that the top
# bar (tabs, breadcrumb, run button) and the side toolbar leave free in a 1600 x 1000 browser
# window (from x 59 and y 90 in the 0.8.0 frontend), or any larger one.
VISIBLE_ORIGIN = (75, 105)
VISIBLE_SIZE = (1480, 800)


def _sd_text(clip, positive, negative=NEGATIVE):
    return {
        "pos": ("CLIPTextEncode", {"text": positive, "clip": clip}, "Positive prompt"),
        "neg": ("CLIPTextEncode", {"text": negative, "clip": clip}, "Negative prompt"),
    }


def _sample_and_save(model, pos, neg, latent, vae, prefix, steps, cfg, sampler="dpmpp_2m", scheduler="karras"):
    return {
        "sampler": ("KSampler", {"model": model, "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                                 "scheduler": scheduler, "positive": pos, "negative": neg, "latent_image": latent,
                                 "denoise": 1.0}, None),
        "decode": ("VAEDecode", {"samples": ["sampler", 0], "vae": vae}, None),
        "save": ("SaveImage", {"images": ["decode", 0], "filename_prefix": prefix}, None),
    }


def model_files(graph):
    """[(folder, file name, url)] of every model file a graph loads, in graph order."""
    out = []
    for _cls, inputs, _title in graph.values():
        for v in inputs.values():
            entry = (MODEL_FOLDER[v], v, MODELS[MODEL_FOLDER[v], v]) if isinstance(v, str) and v in MODEL_FOLDER else None
            if entry and entry not in out:
                out.append(entry)
    return out


def _note(graph, text):
    """A note with the workflow's text, then every model file it loads: where it goes, where from."""
    files = [f"models/{folder}/{file}  ({source_repo(url)})" for folder, file, url in model_files(graph)]
    return {"note": ("Note", {"text": text + "\n\nFiles (the missing-models dialog offers each download):\n" + "\n".join(files)},
                     "Files and notes")}


def controlnext_sd15_pose():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Person photo (pose source)"),
         "pose": ("XCtrl_DWPose", {"image": ["image", 0], "resolution": 512, "draw_hands": False, "draw_face": False}, None),
         "preview": ("PreviewImage", {"images": ["pose", 0]}, "Pose"),
         "cnx": ("XCtrl_LoadControlNeXt", {"control_file": "ControlNeXt-SD1.5/deepfashion_multiview/controlnet.safetensors",
                                           "unet_weights": "ControlNeXt-SD1.5/deepfashion_multiview/unet.safetensors"}, None),
         "apply": ("XCtrl_ApplyControlNeXt", {"model": ["ckpt", 0], "controlnext": ["cnx", 0], "image": ["pose", 0],
                                              "strength": 1.0}, None),
         "latent": ("EmptyLatentImage", {"width": 512, "height": 768, "batch_size": 1}, None)}
    g.update(_sd_text(["ckpt", 1], "a woman in an elegant white dress, full body, fashion photo, plain background"))
    g.update(_sample_and_save(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["ckpt", 2], "xctrl/controlnext_sd15_pose", 25, 7.0))
    g.update(_note(g, "ControlNeXt SD1.5 pose: the authors' deepfashion_multiview module and its UNet weights.\n"
                      "Pose: DWPose body only, drawn OpenPose style. Trained on DeepFashion (one person, plain background)."))
    return g


def _controlnext_sdxl(kind):
    canny = kind == "canny"
    name = "anime_canny" if canny else "vidit_depth"
    pre = (("XCtrl_Canny", {"image": ["image", 0], "mode": "median", "sigma": 0.33}, None) if canny else
           ("XCtrl_DepthAnythingV2", {"image": ["image", 0], "render": "viridis"}, None))
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Source image"),
         "hint": pre,
         "preview": ("PreviewImage", {"images": ["hint", 0]}, "Condition"),
         "cnx": ("XCtrl_LoadControlNeXt", {"control_file": f"ControlAny-SDXL/{name}/controlnet.safetensors",
                                           "unet_weights": f"ControlAny-SDXL/{name}/unet.safetensors"}, None),
         "apply": ("XCtrl_ApplyControlNeXt", {"model": ["ckpt", 0], "controlnext": ["cnx", 0], "image": ["hint", 0],
                                              "strength": 0.35 if canny else 1.0}, None),
         "latent": ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None)}
    g.update(_sd_text(["ckpt", 1], "anime illustration of a girl in a garden, detailed, vivid colours" if canny else
                      "a cosy living room with large windows, warm evening light, photo"))
    g.update(_sample_and_save(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["ckpt", 2],
                              f"xctrl/controlnext_sdxl_{kind}", 30, 6.0))
    g.update(_note(g, f"ControlNeXt SDXL {kind}: the authors' ControlAny-SDXL/{name} module and its UNet deltas.\n" +
                   ("Canny with median thresholds (as trained); strength 0.35 as the authors suggest for canny." if canny else
                    "Depth rendered with the viridis colormap (as trained); strength 1.0.")))
    return g


def controlnext_sdxl_canny():
    return _controlnext_sdxl("canny")


def controlnext_sdxl_depth():
    return _controlnext_sdxl("depth")


def controlnext_sdxl_canny_scheduled():
    """Canny control strong early and fading out by 60 % of the steps, on the subject only (a
    mask of the near half of the depth map)."""
    g = _controlnext_sdxl("canny")
    g.update({
        "depth": ("XCtrl_DepthAnythingV2", {"image": ["image", 0], "render": "grey"}, "Depth (for the subject mask)"),
        "depth_mask": ("ImageToMask", {"image": ["depth", 0], "channel": "red"}, None),
        "subject": ("ThresholdMask", {"mask": ["depth_mask", 0], "value": 0.5}, "Subject mask (near = white)"),
        "kf_start": ("XCtrl_StepKeyframe", {"start_percent": 0.0, "strength": 1.0, "interpolation": "linear",
                                            "guarantee_steps": 1}, "Strong at the start, fading"),
        "kf_end": ("XCtrl_StepKeyframe", {"previous": ["kf_start", 0], "start_percent": 0.6, "strength": 0.0,
                                          "interpolation": "hold", "guarantee_steps": 1}, "Off from 60 %"),
    })
    apply_cls, apply_inputs, apply_title = g["apply"]
    g["apply"] = (apply_cls, dict(apply_inputs, mask=["subject", 0], schedule=["kf_end", 0]), apply_title)
    save_cls, save_inputs, save_title = g["save"]
    g["save"] = (save_cls, dict(save_inputs, filename_prefix="xctrl/controlnext_sdxl_canny_scheduled"), save_title)
    g.pop("note")
    g.update(_note(g, "ControlNeXt SDXL canny with a step schedule and a mask: the canny control starts at full "
                      "strength (0.35), fades linearly to 0 at 60 % of the steps (the later steps refine freely) and acts "
                      "only where the depth map says the subject is (near half).\n"
                      "Schedules: Step Keyframe (XCtrl) nodes chain; Advanced-ControlNet's timestep keyframes connect too."))
    return g


SVD_W, SVD_H = 576, 1024  # the authors' reference resolution (portrait)


def _controlnext_svd_v2(frames, driving_frames, long_video):
    """ControlNeXt-SVD v2 with the authors' settings: reference image resized to cover 576x1024 and
    center-cropped; poses of every 2nd driving frame aligned to the reference pose, with the
    reference pose as frame 0; fps 7 (the model sees 6), motion bucket 128, augmentation 0.02;
    constant CFG 3, 25 Euler steps on the Karras schedule (the reference scheduler's sigmas)."""
    g = {"ckpt": ("ImageOnlyCheckpointLoader", {"ckpt_name": "svd_xt_1_1.safetensors"}, "SVD-XT 1.1 (CLIP vision + VAE)"),
         "unet": ("UNETLoader", {"unet_name": "controlnext-svd_v2-unet-fp16_converted.safetensors", "weight_dtype": "default"},
                  "ControlNeXt-SVD v2 UNet"),
         "ref": ("LoadImage", {"image": IMAGE}, "Reference image (first frame)"),
         "ref_crop": ("ImageScale", {"image": ["ref", 0], "upscale_method": "bilinear", "width": SVD_W, "height": SVD_H,
                                     "crop": "center"}, "Reference: cover 576x1024, center crop"),
         "video": ("LoadVideo", {"file": POSE_VIDEO}, "Driving video (poses)"),
         "frames": ("GetVideoComponents", {"video": ["video", 0]}, None),
         "clip_frames": ("ImageFromBatch", {"image": ["frames", 0], "batch_index": 0, "length": driving_frames},
                         f"Driving frames 0-{driving_frames - 1}"),
         "ref_pose": ("XCtrl_DWPose", {"image": ["ref_crop", 0], "resolution": 512}, "Reference pose"),
         "poses": ("XCtrl_DWPose", {"image": ["clip_frames", 0], "resolution": 512, "frame_stride": 2},
                   "Driving poses (every 2nd frame)"),
         "render": ("XCtrl_RenderPose", {"pose_keypoint": ["poses", 1], "style": "controlnext_svd_v2", "width": SVD_W,
                                         "height": SVD_H, "reference_pose": ["ref_pose", 1], "prepend_reference": True},
                    f"Pose frames: reference pose + {frames - 1} aligned"),
         "preview": ("PreviewImage", {"images": ["render", 0]}, "Pose frames"),
         "cnx": ("XCtrl_LoadControlNeXt", {"control_file": "controlnext-svd_v2-controlnet-fp16.safetensors",
                                           "unet_weights": "none"}, None),
         "apply": ("XCtrl_ApplyControlNeXt", {"model": ["unet", 0], "controlnext": ["cnx", 0],
                                              "image": ["render", 0], "strength": 1.0}, None),
         "cond": ("XCtrl_SVDReferenceConditioning", {"clip_vision": ["ckpt", 1], "init_image": ["ref_crop", 0], "vae": ["ckpt", 2],
                                                     "width": SVD_W, "height": SVD_H, "video_frames": frames,
                                                     "motion_bucket_id": 128, "fps": 7, "augmentation_level": 0.02, "seed": 42},
                  "SVD conditioning as the reference pipeline")}
    model = ["apply", 0]
    if long_video:
        g["windows"] = ("XCtrl_ControlNeXtSVDLongVideo", {"model": model, "frames_per_window": 24, "overlap": 6,
                                                          "cfg_ramp": "constant"}, "Windows of 24, overlap 6")
        model = ["windows", 0]
    g.update({
        "sampler": ("KSampler", {"model": model, "seed": 42, "steps": 25, "cfg": 3.0, "sampler_name": "euler",
                                 "scheduler": "karras", "positive": ["cond", 0], "negative": ["cond", 1],
                                 "latent_image": ["cond", 2], "denoise": 1.0}, None),
        "decode": ("VAEDecode", {"samples": ["sampler", 0], "vae": ["ckpt", 2]}, None),
        "save": ("SaveAnimatedWEBP", {"images": ["decode", 0], "filename_prefix": "xctrl/controlnext_svd_v2", "fps": 15.0,
                                      "lossless": False, "quality": 90, "method": "default"}, None)})
    g.update(_note(g,
        ("ControlNeXt-SVD v2 long video: the authors' windows of 24 frames, overlap 6.\n" if long_video else
         "ControlNeXt-SVD v2: animate the reference image with the poses of the driving video.\n") +
        "The UNet and control files are ComfyUI conversions of the authors' ControlNeXt-SVD/v2 weights.\n"
        f"input/: your driving video as pose_video.mp4. video_frames = pose frames = 1 + every 2nd of the first "
        f"{driving_frames} driving frames = {frames}; change both together.\n"
        "Reference settings: fps 7 (the model sees 6), motion bucket 128, augmentation 0.02, cfg 3, 25 steps euler/karras; "
        "ComfyUI's SVD_img2vid_Conditioning works too, but crops the image to a square for CLIP vision and adds twice "
        "the augmentation noise."))
    return g


def controlnext_svd_v2_pose_video():
    return _controlnext_svd_v2(14, 26, long_video=False)


def controlnext_svd_v2_long_video():
    return _controlnext_svd_v2(72, 142, long_video=True)


def controlnet_xs_sdxl_depth():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Source image"),
         "hint": ("XCtrl_DepthAnythingV2", {"image": ["image", 0], "render": "grey"}, None),
         "preview": ("PreviewImage", {"images": ["hint", 0]}, "Depth"),
         "xs": ("XCtrl_LoadControlNetXS", {"control_file": "sdxl_encD_depth_48m.safetensors"}, None),
         "apply": ("XCtrl_ApplyControlNetXS", {"model": ["ckpt", 0], "controlnet_xs": ["xs", 0], "image": ["hint", 0],
                                              "strength": 1.0}, None),
         "latent": ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None)}
    g.update(_sd_text(["ckpt", 1], "a futuristic city street at dusk, neon signs, photo"))
    g.update(_sample_and_save(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["ckpt", 2], "xctrl/controlnet_xs_sdxl_depth", 30, 6.0))
    g.update(_note(g, "ControlNet-XS SDXL depth: the authors' 48M-parameter depth model.\n"
                      "Depth: Depth Anything V2 Small, grey, white = near. The canny models (sdxl_encD_canny_48m / _20m) "
                      "work the same way with the Canny node."))
    return g


def controlnet_xs_sd21_canny():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "v2-1_512-ema-pruned.safetensors"}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Source image"),
         "hint": ("XCtrl_Canny", {"image": ["image", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 250}, None),
         "preview": ("PreviewImage", {"images": ["hint", 0]}, "Edges"),
         "xs": ("XCtrl_LoadControlNetXS", {"control_file": "Testing-ConrolNetXS-SD2.1-canny/diffusion_pytorch_model.safetensors"},
                None),
         "apply": ("XCtrl_ApplyControlNetXS", {"model": ["ckpt", 0], "controlnet_xs": ["xs", 0], "image": ["hint", 0],
                                              "strength": 1.0}, None),
         "latent": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, None)}
    g.update(_sd_text(["ckpt", 1], "a stone bridge over a river in autumn, photo"))
    g.update(_sample_and_save(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["ckpt", 2], "xctrl/controlnet_xs_sd21_canny", 30, 7.0))
    g.update(_note(g, "ControlNet-XS SD2.1 canny on SD2.1-base 512 (eps): the 14M-parameter model in diffusers' "
                      "adapter format (the authors' sd21_encD_canny_14m.ckpt / _depth_14m.ckpt load the same way).\n"
                      "Canny 100 / 250, as the authors' examples."))
    return g


def mi_sd15_pose_canny():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}, None),
         "image_pose": ("LoadImage", {"image": IMAGE}, "Pose source"),
         "image_canny": ("LoadImage", {"image": IMAGE}, "Edge source"),
         "pose": ("XCtrl_DWPose", {"image": ["image_pose", 0], "resolution": 512, "draw_hands": False, "draw_face": False}, None),
         "canny": ("XCtrl_Canny", {"image": ["image_canny", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 200}, None),
         "cn_pose": ("ControlNetLoader", {"control_net_name": "control_v11p_sd15_openpose_fp16.safetensors"}, None),
         "cn_canny": ("ControlNetLoader", {"control_net_name": "control_v11p_sd15_canny_fp16.safetensors"}, None),
         "apply_pose": ("ControlNetApplyAdvanced", {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn_pose", 0],
                                                    "image": ["pose", 0], "strength": 1.0, "start_percent": 0.0,
                                                    "end_percent": 1.0}, "Apply ControlNet (pose)"),
         "apply_canny": ("ControlNetApplyAdvanced", {"positive": ["apply_pose", 0], "negative": ["apply_pose", 1],
                                                     "control_net": ["cn_canny", 0], "image": ["canny", 0], "strength": 1.0,
                                                     "start_percent": 0.0, "end_percent": 1.0}, "Apply ControlNet (canny)"),
         "mi": ("XCtrl_MIBalancedControl", {"model": ["ckpt", 0], "positive": ["apply_canny", 0], "negative": ["apply_canny", 1],
                                            "mode": "paper", "granularity": "layer", "cap": 20.0}, None),
         "latent": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, None),
         "stats": ("XCtrl_MILambdaStats", {"positive": ["mi", 1], "samples": ["sampler", 0]}, None)}
    g.update(_sd_text(["ckpt", 1], "a dancer on a stage, dramatic light, photo"))
    g.update(_sample_and_save(["mi", 0], ["mi", 1], ["mi", 2], ["latent", 0], ["ckpt", 2], "xctrl/mi_sd15_pose_canny", 25, 7.0))
    g.update(_note(g, "MIControlNet balanced pose + canny with stock ControlNet v1.1 models (fp16 copies).\n"
                   "mode paper = the paper's formulas; sum = stock ComfyUI addition (to compare)."))
    return g


def mi_sd35_canny_depth():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "sd3.5_large.safetensors"}, "SD3.5 Large (MMDiT + VAE)"),
         "clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sd3"}, None),
         "image_canny": ("LoadImage", {"image": IMAGE}, "Edge source"),
         "image_depth": ("LoadImage", {"image": IMAGE}, "Depth source"),
         "canny": ("XCtrl_Canny", {"image": ["image_canny", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 200}, None),
         "depth": ("XCtrl_DepthAnythingV2", {"image": ["image_depth", 0], "render": "grey"}, None),
         "cn_canny": ("ControlNetLoader", {"control_net_name": "sd3.5_large_controlnet_canny.safetensors"}, None),
         "cn_depth": ("ControlNetLoader", {"control_net_name": "sd3.5_large_controlnet_depth.safetensors"}, None),
         "apply_canny": ("ControlNetApplyAdvanced", {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn_canny", 0],
                                                     "image": ["canny", 0], "strength": 0.8, "start_percent": 0.0,
                                                     "end_percent": 1.0, "vae": ["ckpt", 2]}, "Apply ControlNet (canny)"),
         "apply_depth": ("ControlNetApplyAdvanced", {"positive": ["apply_canny", 0], "negative": ["apply_canny", 1],
                                                     "control_net": ["cn_depth", 0], "image": ["depth", 0], "strength": 0.8,
                                                     "start_percent": 0.0, "end_percent": 1.0, "vae": ["ckpt", 2]},
                         "Apply ControlNet (depth)"),
         "mi": ("XCtrl_MIBalancedControl", {"model": ["ckpt", 0], "positive": ["apply_depth", 0], "negative": ["apply_depth", 1],
                                            "mode": "paper", "granularity": "layer", "cap": 20.0}, None),
         "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None)}
    g.update(_sd_text(["clip", 0], "a red vintage car parked in front of a brick house, photo"))
    g.update(_sample_and_save(["mi", 0], ["mi", 1], ["mi", 2], ["latent", 0], ["ckpt", 2], "xctrl/mi_sd35_canny_depth", 40, 4.0,
                              sampler="euler", scheduler="sgm_uniform"))
    g.update(_note(g, "MIControlNet balanced canny + depth on SD3.5 Large with Stability's ControlNets.\n"
                   "T5-XXL is left out to fit 16 GB; for better prompt following use TripleCLIPLoader with t5xxl_fp16.safetensors."))
    return g


def mi_flux_canny_depth():
    """Flux dev with XLabs' canny and depth ControlNets, balanced (the Flux guidance as Flux dev wants, cfg 1)."""
    g = {"unet": ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, "Flux dev"),
         "clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                     "type": "flux"}, None),
         "vae": ("VAELoader", {"vae_name": "ae.safetensors"}, None),
         "image_canny": ("LoadImage", {"image": IMAGE}, "Edge source"),
         "image_depth": ("LoadImage", {"image": IMAGE}, "Depth source"),
         "canny": ("XCtrl_Canny", {"image": ["image_canny", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 200}, None),
         "depth": ("XCtrl_DepthAnythingV2", {"image": ["image_depth", 0], "render": "grey"}, None),
         "guided": ("FluxGuidance", {"conditioning": ["pos", 0], "guidance": 3.5}, None),
         "cn_canny": ("ControlNetLoader", {"control_net_name": "flux-canny-controlnet-v3.safetensors"}, None),
         "cn_depth": ("ControlNetLoader", {"control_net_name": "flux-depth-controlnet-v3.safetensors"}, None),
         "apply_canny": ("ControlNetApplyAdvanced", {"positive": ["guided", 0], "negative": ["neg", 0], "control_net": ["cn_canny", 0],
                                                     "image": ["canny", 0], "strength": 0.7, "start_percent": 0.0,
                                                     "end_percent": 1.0, "vae": ["vae", 0]}, "Apply ControlNet (canny)"),
         "apply_depth": ("ControlNetApplyAdvanced", {"positive": ["apply_canny", 0], "negative": ["apply_canny", 1],
                                                     "control_net": ["cn_depth", 0], "image": ["depth", 0], "strength": 0.7,
                                                     "start_percent": 0.0, "end_percent": 1.0, "vae": ["vae", 0]},
                         "Apply ControlNet (depth)"),
         "mi": ("XCtrl_MIBalancedControl", {"model": ["unet", 0], "positive": ["apply_depth", 0], "negative": ["apply_depth", 1],
                                            "mode": "paper", "granularity": "layer", "cap": 20.0}, None),
         "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None)}
    g.update(_sd_text(["clip", 0], "a lighthouse on a cliff at sunset, dramatic sky, photo", negative=""))
    g.update(_sample_and_save(["mi", 0], ["mi", 1], ["mi", 2], ["latent", 0], ["vae", 0], "xctrl/mi_flux_canny_depth", 20, 1.0,
                              sampler="euler", scheduler="simple"))
    g.update(_note(g, "MIControlNet balanced canny + depth on Flux dev with XLabs' v3 ControlNets (each strength 0.7).\n"
                      "Flux dev is guidance-distilled: the Flux Guidance node sets 3.5, the sampler's cfg stays 1 (the negative "
                      "prompt then has no effect). Union ControlNets work the same way: one Apply ControlNet per type."))
    return g


def mi_zimage_pose_depth():
    """Z-Image-Turbo with the Fun ControlNet Union twice (pose, depth), the pose on the person only,
    balanced (the template's sampler settings: 8 steps, cfg 1, res_multistep)."""
    g = {"unet": ("UNETLoader", {"unet_name": "z_image_turbo_bf16.safetensors", "weight_dtype": "default"}, "Z-Image-Turbo"),
         "clip": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}, None),
         "vae": ("VAELoader", {"vae_name": "ae.safetensors"}, None),
         "shift": ("ModelSamplingAuraFlow", {"model": ["unet", 0], "shift": 3.0}, None),
         "union": ("ModelPatchLoader", {"name": "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"}, "Fun ControlNet Union"),
         "image": ("LoadImage", {"image": IMAGE}, "Control source"),
         "pose": ("XCtrl_DWPose", {"image": ["image", 0], "resolution": 1024, "draw_hands": True, "draw_face": False}, None),
         "depth": ("XCtrl_DepthAnythingV2", {"image": ["image", 0], "render": "grey"}, None),
         "depth_mask": ("ImageToMask", {"image": ["depth", 0], "channel": "red"}, None),
         "subject": ("ThresholdMask", {"mask": ["depth_mask", 0], "value": 0.5}, "Subject mask (near = white)"),
         "apply_pose": ("XCtrl_ApplyZImageFunControlNet", {"model": ["shift", 0], "model_patch": ["union", 0], "vae": ["vae", 0],
                                                           "strength": 1.0, "image": ["pose", 0],
                                                           "control_mask": ["subject", 0]}, "Pose (on the subject)"),
         "apply_depth": ("XCtrl_ApplyZImageFunControlNet", {"model": ["apply_pose", 0], "model_patch": ["union", 0],
                                                            "vae": ["vae", 0], "strength": 0.6, "image": ["depth", 0],
                                                            "end_percent": 0.8}, "Depth (until 80 %)"),
         "mi": ("XCtrl_MIBalancedModelPatches", {"model": ["apply_depth", 0], "mode": "paper", "granularity": "pixel",
                                                 "cap": 20.0}, None),
         "pos": ("CLIPTextEncode", {"text": "a dancer in a red dress on a wooden stage, warm light, photo", "clip": ["clip", 0]},
                 "Positive prompt"),
         "neg": ("ConditioningZeroOut", {"conditioning": ["pos", 0]}, None),
         "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None),
         "stats": ("XCtrl_MILambdaStats", {"positive": ["pos", 0], "samples": ["sampler", 0], "model": ["mi", 0]}, None)}
    g.update(_sample_and_save(["mi", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["vae", 0], "xctrl/mi_zimage_pose_depth", 8, 1.0,
                              sampler="res_multistep", scheduler="simple"))
    g.update(_note(g, "Z-Image-Turbo with the Fun ControlNet Union applied twice (pose 1.0 on the subject only, depth 0.6 "
                      "until 80 % of the steps), balanced by MI Balanced Model Patches instead of summed. Needs a ComfyUI "
                      "with Z-Image Fun ControlNet support (0.8.0 or newer; tested with 0.33.0).\n"
                      "mode sum = core's plain addition, to compare."))
    return g


def mi_qwen_image_canny_depth():
    """Qwen-Image 2512 with DiffSynth's canny and depth ControlNets (model patches), balanced."""
    g = {"unet": ("UNETLoader", {"unet_name": "qwen_image_2512_fp8_e4m3fn.safetensors", "weight_dtype": "default"},
                  "Qwen-Image 2512"),
         "clip": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                                 "device": "default"}, None),
         "vae": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}, None),
         "shift": ("ModelSamplingAuraFlow", {"model": ["unet", 0], "shift": 3.1}, None),
         "cn_canny": ("ModelPatchLoader", {"name": "qwen_image_canny_diffsynth_controlnet.safetensors"}, None),
         "cn_depth": ("ModelPatchLoader", {"name": "qwen_image_depth_diffsynth_controlnet.safetensors"}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Control source"),
         "canny": ("XCtrl_Canny", {"image": ["image", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 200}, None),
         "depth": ("XCtrl_DepthAnythingV2", {"image": ["image", 0], "render": "grey"}, None),
         "apply_canny": ("XCtrl_ApplyQwenImageDiffsynthControlNet", {"model": ["shift", 0], "model_patch": ["cn_canny", 0],
                                                                     "vae": ["vae", 0], "image": ["canny", 0],
                                                                     "strength": 1.0}, "Canny"),
         "apply_depth": ("XCtrl_ApplyQwenImageDiffsynthControlNet", {"model": ["apply_canny", 0], "model_patch": ["cn_depth", 0],
                                                                     "vae": ["vae", 0], "image": ["depth", 0],
                                                                     "strength": 1.0}, "Depth"),
         "mi": ("XCtrl_MIBalancedModelPatches", {"model": ["apply_depth", 0], "mode": "paper", "granularity": "layer",
                                                 "cap": 20.0}, None),
         "latent": ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1}, None),
         "stats": ("XCtrl_MILambdaStats", {"positive": ["pos", 0], "samples": ["sampler", 0], "model": ["mi", 0]}, None)}
    g.update(_sd_text(["clip", 0], "a stone bridge over a river in autumn, photo", negative=" "))
    g.update(_sample_and_save(["mi", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["vae", 0], "xctrl/mi_qwen_image_canny_depth",
                              20, 2.5, sampler="euler", scheduler="simple"))
    g.update(_note(g, "Qwen-Image 2512 with DiffSynth's canny and depth block-wise ControlNets (model patches, trained for "
                      "Qwen-Image; same architecture), balanced by MI Balanced Model Patches instead of summed.\n"
                      "mode sum = core's plain addition, to compare."))
    return g


def controlnext_sd15_train_canny():
    """Train a canny ControlNeXt on a folder of captioned images (the conditions made from the images
    by the Canny node, so they line up with them), then use it."""
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}, None),
         "dataset": ("LoadImageTextDataSetFromFolder", {"folder": TRAINING_FOLDER}, "Training images + captions (input/)"),
         "encode": ("MakeTrainingDataset", {"images": ["dataset", 0], "vae": ["ckpt", 2], "clip": ["ckpt", 1],
                                            "texts": ["dataset", 1]}, "Latents + caption conditionings"),
         "conditions": ("XCtrl_Canny", {"image": ["dataset", 0], "mode": "fixed", "low_threshold": 100,
                                        "high_threshold": 200}, "Condition of each image"),
         "empty": ("CLIPTextEncode", {"text": "", "clip": ["ckpt", 1]}, "Empty prompt (20 % of the samples)"),
         "train": ("XCtrl_TrainControlNeXt", {"model": ["ckpt", 0], "latents": ["encode", 0], "images": ["conditions", 0],
                                              "positive": ["encode", 1], "steps": 1000, "batch_size": 1,
                                              "gradient_accumulation": 1, "lr_module": 1e-4, "lr_unet": 1e-5,
                                              "unet_pattern": "auto", "scale": 1.0, "seed": 0, "empty_prompt_rate": 0.2,
                                              "empty_conditioning": ["empty", 0], "gradient_checkpointing": False,
                                              "training_dtype": "float32", "name": "sd15_canny_trained",
                                              "checkpoint_every": 100, "resume": True}, None),
         "loss": ("PreviewImage", {"images": ["train", 1]}, "Loss curve"),
         "image": ("LoadImage", {"image": IMAGE}, "Test image"),
         "hint": ("XCtrl_Canny", {"image": ["image", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 200}, None),
         "apply": ("XCtrl_ApplyControlNeXt", {"model": ["ckpt", 0], "controlnext": ["train", 0], "image": ["hint", 0],
                                              "strength": 1.0}, "Apply the trained ControlNeXt"),
         "latent": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, None)}
    g.update(_sd_text(["ckpt", 1], "a stone house by a lake, photo"))
    g.update(_sample_and_save(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["ckpt", 2], "xctrl/controlnext_trained",
                              25, 7.0))
    g.update(_note(g, "Train a ControlNeXt for canny edges on SD1.5 with the authors' recipe, then sample with it.\n"
                      f"Put training images (all one size, e.g. 512x512) with captions (name.png + name.txt) into "
                      f"ComfyUI/input/{TRAINING_FOLDER}/. The files go to models/controlnet/sd15_canny_trained/ "
                      "(controlnet.safetensors + unet_weight_increasements.safetensors, and a checkpoint: run again "
                      "to continue). Needs ComfyUI 0.8 (its dataset nodes)."))
    return g


WORKFLOWS = {
    "controlnext_sd15_pose": controlnext_sd15_pose,
    "controlnext_sdxl_canny": controlnext_sdxl_canny,
    "controlnext_sdxl_depth": controlnext_sdxl_depth,
    "controlnext_sdxl_canny_scheduled": controlnext_sdxl_canny_scheduled,
    "controlnext_svd_v2_pose_video": controlnext_svd_v2_pose_video,
    "controlnext_svd_v2_long_video": controlnext_svd_v2_long_video,
    "controlnet_xs_sdxl_depth": controlnet_xs_sdxl_depth,
    "controlnet_xs_sd21_canny": controlnet_xs_sd21_canny,
    "mi_sd15_pose_canny": mi_sd15_pose_canny,
    "mi_sd35_canny_depth": mi_sd35_canny_depth,
    "mi_flux_canny_depth": mi_flux_canny_depth,
    "controlnext_sd15_train_canny": controlnext_sd15_train_canny,
    "mi_zimage_pose_depth": mi_zimage_pose_depth,
    "mi_qwen_image_canny_depth": mi_qwen_image_canny_depth,
}
# Workflows that need nodes only newer ComfyUI versions have (the tests skip them elsewhere).
REQUIRES = {"controlnext_sd15_train_canny": ("LoadImageTextDataSetFromFolder", "MakeTrainingDataset"),
            "mi_zimage_pose_depth": ("ModelPatchLoader", "ModelSamplingAuraFlow", "ConditioningZeroOut")}
# Workflows the tests do not run (their models are PLACEHOLDERS), with the reason.
NOT_RUN = {"mi_flux_canny_depth": "Flux stand-ins would need ComfyUI's full-size T5-XXL (4.7B parameters); MI on Flux "
                                  "is tested on a tiny Flux in test_mi_controlnet.py",
           "mi_zimage_pose_depth": "core builds Z-Image and its control patch at full width (no small stand-ins); tested on "
                                   "tiny models in test_model_patch_mi.py",
           "mi_qwen_image_canny_depth": "core builds Qwen-Image and its control patches at full width (no small stand-ins); "
                                        "tested on tiny models in test_model_patch_mi.py"}

# The file name of each workflow (without .json): the template's title in ComfyUI's templates
# menu. No "-" or "_" (the frontend turns them into spaces in the description it derives).
TITLES = {
    "controlnext_sd15_pose": "ControlNeXt SD1.5 pose",
    "controlnext_sdxl_canny": "ControlNeXt SDXL canny",
    "controlnext_sdxl_depth": "ControlNeXt SDXL depth",
    "controlnext_sdxl_canny_scheduled": "ControlNeXt SDXL canny fading out, on the subject only",
    "controlnext_svd_v2_pose_video": "ControlNeXt SVD v2 pose video (14 frames)",
    "controlnext_svd_v2_long_video": "ControlNeXt SVD v2 long pose video (72 frames in windows)",
    "controlnet_xs_sdxl_depth": "ControlNet XS SDXL depth",
    "controlnet_xs_sd21_canny": "ControlNet XS SD2.1 canny",
    "mi_sd15_pose_canny": "MIControlNet SD1.5 balanced pose and canny",
    "mi_sd35_canny_depth": "MIControlNet SD3.5 Large balanced canny and depth",
    "mi_flux_canny_depth": "MIControlNet Flux dev balanced canny and depth",
    "controlnext_sd15_train_canny": "Train ControlNeXt for canny on SD1.5, then use it",
    "mi_zimage_pose_depth": "MIControlNet Z Image Turbo Fun ControlNet Union balanced pose and depth, pose masked",
    "mi_qwen_image_canny_depth": "MIControlNet Qwen Image 2512 balanced DiffSynth canny and depth",
}


# What each does, for the README's table.
SUMMARIES = {
    "controlnext_sd15_pose": "DWPose body skeleton -> ControlNeXt SD1.5 with its UNet weights",
    "controlnext_sdxl_canny": "Canny (median thresholds) -> ControlNeXt SDXL with its UNet deltas, strength 0.35",
    "controlnext_sdxl_depth": "Depth Anything V2 (viridis) -> ControlNeXt SDXL with its UNet deltas",
    "controlnext_sdxl_canny_scheduled": "the canny workflow with a step schedule (full strength fading to 0 by 60 % of "
                                        "the steps) and a mask (the near half of a depth map): control where and when",
    "controlnext_svd_v2_pose_video": "14 frames with the authors' settings: reference image cropped to 576x1024, DWPose on "
                                     "every 2nd driving frame aligned to the reference pose, reference pose first -> "
                                     "ControlNeXt-SVD v2 (reference-pipeline SVD conditioning, cfg 3, 25 steps euler/karras), WebP",
    "controlnext_svd_v2_long_video": "the same for 72 frames (the first 142 driving frames), in the authors' windows of 24 "
                                     "with overlap 6",
    "controlnet_xs_sdxl_depth": "Depth Anything V2 (grey) -> ControlNet-XS SDXL",
    "controlnet_xs_sd21_canny": "Canny -> ControlNet-XS SD2.1 (diffusers' adapter format)",
    "mi_sd15_pose_canny": "stock Load ControlNet + Apply ControlNet (pose, then canny) -> MI Balanced Control; "
                          "MI Lambda Stats shows the per-layer weights",
    "mi_sd35_canny_depth": "SD3.5 Large ControlNets (canny + depth, Apply ControlNet with VAE) -> MI Balanced Control",
    "mi_flux_canny_depth": "Flux dev with XLabs' canny and depth ControlNets -> MI Balanced Control (Flux guidance 3.5, cfg 1)",
    "controlnext_sd15_train_canny": "a folder of captioned images -> ComfyUI's dataset nodes + Canny -> Train ControlNeXt "
                                    "-> Apply ControlNeXt -> sampler (ComfyUI 0.8)",
    "mi_zimage_pose_depth": "DWPose + Depth Anything V2 -> Apply Z-Image Fun ControlNet (XCtrl) twice (pose masked to the "
                            "subject, depth until 80 %) -> MI Balanced Model Patches (ComfyUI 0.8 or newer)",
    "mi_qwen_image_canny_depth": "Canny + Depth Anything V2 -> Apply Qwen Image DiffSynth ControlNet (XCtrl) twice -> "
                                 "MI Balanced Model Patches",
}


def workflow_path(name, ext=".json"):
    return os.path.join(WORKFLOW_DIR, TITLES[name] + ext)


def files_of(name):
    return model_files(WORKFLOWS[name]())


README_BEGIN, README_END = "<!-- generated:workflows -->", "<!-- /generated:workflows -->"


def readme_table():
    """The README's table of workflows and the files each loads (between README_BEGIN/END)."""
    lines = ["| workflow (templates menu title) | what it does | files: `ComfyUI/models/<folder>/<name>` (download) |",
             "|---|---|---|"]
    for name in WORKFLOWS:
        files = "; ".join(f"[`{folder}/{file}`]({url})" for folder, file, url in files_of(name))
        lines.append(f"| {TITLES[name]} | {SUMMARIES[name]} | {files} |")
    return "\n".join([README_BEGIN, *lines, README_END])


def readme_with_table(text):
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[:start] + readme_table() + text[end:]

# The widget values the end-to-end tests lower to run on a CPU in bounded time (by input name).
TEST_OVERRIDES = {
    "width": 64, "height": 64, "steps": 1, "video_frames": 3, "length": 3, "batch_size": 1,
    "frames_per_window": 2, "overlap": 1,  # 3 frames in 2 windows: the long-video path runs
}


# ----------------------------------------------------------------------------- conversion
def _is_link(v):
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def _input_specs(info):
    """[(name, type, options, optional)] in the order the frontend creates slots/widgets."""
    out = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, "COMBO" if isinstance(typ, list) else typ, opts, section == "optional"))
    return out


def _is_widget(typ, opts):
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def _default(typ, opts, info_spec):
    if "default" in opts:
        return opts["default"]
    if typ == "COMBO":
        options = info_spec[0] if isinstance(info_spec[0], list) else opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[typ]


def _has_seed_control(name, typ, opts):
    return typ == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES)


def widget_values(class_type, inputs, info):
    values = []
    for name, typ, opts, optional in _input_specs(info):
        if not _is_widget(typ, opts):
            continue
        section = "optional" if optional else "required"
        v = inputs.get(name, _default(typ, opts, info["input"][section][name]))
        if _is_link(v):  # fed by a link: the widget keeps its default value slot
            v = _default(typ, opts, info["input"][section][name])
        values.append(v)
        if _has_seed_control(name, typ, opts):
            values.append("fixed")
        if opts.get("image_upload"):
            values.append("image")
    return values


def _depths(graph):
    memo = {}

    def depth(nid):
        if nid not in memo:
            memo[nid] = 0
            ups = [v[0] for v in graph[nid][1].values() if _is_link(v)]
            memo[nid] = 1 + max((depth(u) for u in ups), default=-1)
        return memo[nid]

    return {nid: depth(nid) for nid in graph}


def _node_height(n_slots):
    return 46 + 24 * n_slots


def to_ui(graph, object_info):
    """API-style description -> UI workflow JSON (version 0.4)."""
    ids = {key: i + 1 for i, key in enumerate(graph)}
    depths = _depths(graph)
    links, nodes = [], []
    out_links = {}
    next_link = 1
    # links first (so outputs can list them)
    node_inputs = {}
    for key, (cls, inputs, _title) in graph.items():
        if cls in VIRTUAL_NODES:
            node_inputs[key] = []
            continue
        info = object_info[cls]
        slots = []
        for name, typ, opts, optional in _input_specs(info):
            v = inputs.get(name)
            widget = _is_widget(typ, opts)
            if widget and not _is_link(v):
                continue
            link_id = None
            if v is not None:
                if not _is_link(v):
                    raise ValueError(f"{key}.{name}: {cls} takes a link here, got {v!r}")
                src, slot = v
                link_id = next_link
                next_link += 1
                links.append([link_id, ids[src], slot, ids[key], len(slots), info_type(object_info, graph, src, slot)])
                out_links.setdefault((src, slot), []).append(link_id)
            elif not optional:
                raise ValueError(f"{key}.{name}: required input of {cls} not connected")
            slot = {"name": name, "type": typ, "link": link_id}
            if widget:  # a widget fed by a link: an input slot that names its widget
                slot["widget"] = {"name": name}
            slots.append(slot)
        unknown = set(inputs) - {s[0] for s in _input_specs(info)}
        if unknown:
            raise ValueError(f"{key}: {cls} has no inputs {sorted(unknown)}")
        node_inputs[key] = slots
    columns = {}
    order = sorted(graph, key=lambda k: (depths[k], list(graph).index(k)))
    for rank, key in enumerate(order):
        cls, inputs, title = graph[key]
        col = depths[key] if cls not in VIRTUAL_NODES else 0
        if cls in VIRTUAL_NODES:
            node = {"id": ids[key], "type": cls, "pos": None, "size": [400, 200], "flags": {}, "order": rank, "mode": 0,
                    "inputs": [], "outputs": [], "properties": {}, "widgets_values": [inputs["text"]]}
            h = 200
        else:
            info = object_info[cls]
            outputs = []
            for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
                ls = out_links.get((key, slot), [])
                outputs.append({"name": oname, "type": otype, "links": ls, "slot_index": slot})
            wv = widget_values(cls, inputs, info)
            h = _node_height(max(len(node_inputs[key]) + len(wv), len(outputs)))
            if cls in ("LoadImage", "PreviewImage", "SaveImage", "SaveAnimatedWEBP", "LoadVideo"):
                h += 260
            properties = {"Node name for S&R": cls}
            models = model_properties(wv)
            if models:
                properties["models"] = models
            node = {"id": ids[key], "type": cls, "pos": None, "size": [330, h], "flags": {}, "order": rank, "mode": 0,
                    "inputs": node_inputs[key], "outputs": outputs, "properties": properties, "widgets_values": wv}
        if title:
            node["title"] = title
        y = columns.get(col, 40)
        node["pos"] = [40 + 380 * col, y]
        columns[col] = y + h + 50
        nodes.append(node)
    nodes.sort(key=lambda n: n["id"])
    return {
        "last_node_id": len(graph), "last_link_id": next_link - 1, "nodes": nodes, "links": links, "groups": [],
        "config": {}, "extra": {"ds": view_showing(nodes)}, "version": 0.4,
    }


def model_properties(widget_values):
    """The frontend's per-node ``models`` list (name, url, directory) for the files a node's
    widgets select: what its missing-models dialog lists and offers to download."""
    return [{"name": v, "url": MODELS[MODEL_FOLDER[v], v], "directory": MODEL_FOLDER[v]}
            for v in widget_values if isinstance(v, str) and v in MODEL_FOLDER]


TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


def view_showing(nodes):
    """extra.ds (canvas offset and scale; screen = (pos + offset) * scale) that fits every node,
    title bars included, into VISIBLE_SIZE at VISIBLE_ORIGIN, never zooming in past 1."""
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - TITLE_HEIGHT
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = round(min(1.0, VISIBLE_SIZE[0] / (x1 - x0), VISIBLE_SIZE[1] / (y1 - y0)), 3)
    return {"scale": scale, "offset": [round(VISIBLE_ORIGIN[0] / scale - x0, 1), round(VISIBLE_ORIGIN[1] / scale - y0, 1)]}


def info_type(object_info, graph, src, slot):
    return object_info[graph[src][0]]["output"][slot]


def to_api(ui, object_info):
    """UI workflow JSON -> API prompt {id: {class_type, inputs}}, as the frontend converts it."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']}")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        for name, typ, opts, optional in _input_specs(info):
            if name in linked and linked[name] is not None:
                l = links[linked[name]]
                inputs[name] = [str(l[1]), l[2]]
                if _is_widget(typ, opts) and values:  # a widget converted to an input keeps its value slot
                    values.pop(0)
                continue
            if not _is_widget(typ, opts):
                continue
            if not values:  # a widget added after the file was saved: the frontend keeps its default
                section = "optional" if optional else "required"
                inputs[name] = _default(typ, opts, info["input"][section][name])
                continue
            inputs[name] = values.pop(0)
            if _has_seed_control(name, typ, opts) and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                values.pop(0)
            if opts.get("image_upload") and values and values[0] == "image":
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def api_prompt(name, object_info, overrides=None):
    """The API twin of one workflow (what the frontend queues), with ``overrides`` by input name."""
    prompt = to_api(to_ui(WORKFLOWS[name](), object_info), object_info)
    for node in prompt.values():
        for k in list(node["inputs"]):
            if overrides and k in overrides and not _is_link(node["inputs"][k]):
                node["inputs"][k] = overrides[k]
    return prompt


# ----------------------------------------------------------------------------- files
def write_test_inputs(folder, comfy_root):
    """example.png (ComfyUI's own example photo, 64 x 64 here), a 6-frame pose_video.mp4 and a
    two-image captioned training folder."""
    import av
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    src = os.path.join(comfy_root, "input", "example.png")
    img = Image.open(src).convert("RGB") if os.path.isfile(src) else Image.new("RGB", (64, 64), (120, 90, 60))
    img.resize((64, 64)).save(os.path.join(folder, IMAGE))
    training = os.path.join(folder, TRAINING_FOLDER)
    os.makedirs(training, exist_ok=True)
    for i, angle in enumerate((0, 90)):
        img.resize((64, 64)).rotate(angle).save(os.path.join(training, f"item_{i}.png"))
        with open(os.path.join(training, f"item_{i}.txt"), "w") as f:
            f.write(f"a test picture, turned {angle} degrees")
    rng = np.random.default_rng(0)
    with av.open(os.path.join(folder, POSE_VIDEO), "w") as c:
        st = c.add_stream("mpeg4", rate=6)
        st.width, st.height, st.pix_fmt = 64, 64, "yuv420p"
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray((rng.random((64, 64, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in st.encode(frame):
                c.mux(packet)
        for packet in st.encode():
            c.mux(packet)


def write_thumbnail(ui, path):
    """A small picture of the graph: node boxes with titles, links as lines (JPEG)."""
    from PIL import Image, ImageDraw

    xs = [n["pos"][0] + n["size"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] + n["size"][1] for n in ui["nodes"]]
    scale = min(1.0, 1400 / max(xs), 1000 / max(ys))
    w, h = int(max(xs) * scale) + 40, int(max(ys) * scale) + 40
    img = Image.new("RGB", (w, h), (32, 32, 36))
    d = ImageDraw.Draw(img)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for l in ui["links"]:
        a, b = by_id[l[1]], by_id[l[3]]
        x0, y0 = (a["pos"][0] + a["size"][0]) * scale, (a["pos"][1] + 30 + 24 * l[2]) * scale
        x1, y1 = b["pos"][0] * scale, (b["pos"][1] + 30 + 24 * l[4]) * scale
        d.line([(x0, y0), (x1, y1)], fill=(120, 170, 230), width=2)
    for n in ui["nodes"]:
        x, y = n["pos"][0] * scale, n["pos"][1] * scale
        bw, bh = n["size"][0] * scale, n["size"][1] * scale
        ours = n["type"].startswith("XCtrl")
        d.rectangle([x, y, x + bw, y + bh], fill=(60, 52, 80) if ours else (53, 53, 58), outline=(150, 150, 160))
        d.rectangle([x, y, x + bw, y + 22 * scale + 8], fill=(110, 70, 160) if ours else (80, 80, 90))
        title = n.get("title") or n["type"]
        d.text((x + 6, y + 4), title[:40], fill=(240, 240, 240))
        if n["type"] in VIRTUAL_NODES:
            for i, line in enumerate(n["widgets_values"][0].split("\n")[:8]):
                d.text((x + 6, y + 30 + 12 * i), line[:60], fill=(200, 200, 200))
    img.save(path, "JPEG", quality=88)


def _first_option(spec):
    """An input spec with its combo list cut to the first entry (a default's only use of it)."""
    spec = list(spec)
    if isinstance(spec[0], list):
        spec[0] = spec[0][:1]
    if len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        spec[1] = dict(spec[1], options=spec[1]["options"][:1])
    return spec


def stock_definitions(object_info):
    """What the builder reads of the stock (non-pack) nodes the workflows use: inputs, their
    order, outputs."""
    types = sorted({cls for build in WORKFLOWS.values() for cls, _inputs, _title in build().values()
                    if cls not in VIRTUAL_NODES and not cls.startswith("XCtrl_")})
    defs = {}
    for cls in types:
        info = object_info[cls]
        inputs = {section: {name: _first_option(spec) for name, spec in info["input"][section].items()}
                  for section in ("required", "optional") if section in info["input"]}
        defs[cls] = {"input": inputs, "output": info["output"], "output_name": info["output_name"]}
        if info.get("input_order"):
            defs[cls]["input_order"] = info["input_order"]
    return defs


def build_definitions(object_info):
    """The definitions the committed workflows are rebuilt from: the pack's nodes from
    ``object_info``, the stock nodes as recorded when the files were written."""
    with open(STOCK_DEFINITIONS) as f:
        stock = json.load(f)
    return {**stock, **{cls: info for cls, info in object_info.items() if cls.startswith("XCtrl_")}}


def write_all(object_info, folder=WORKFLOW_DIR):
    os.makedirs(folder, exist_ok=True)
    with open(STOCK_DEFINITIONS, "w") as f:
        json.dump(stock_definitions(object_info), f, indent=1, sort_keys=True)
        f.write("\n")
    for name, build in WORKFLOWS.items():
        ui = to_ui(build(), object_info)
        with open(os.path.join(folder, TITLES[name] + ".json"), "w") as f:
            json.dump(ui, f, indent=2)
            f.write("\n")
        write_thumbnail(ui, os.path.join(folder, TITLES[name] + ".jpg"))
    return sorted(WORKFLOWS)


def main(argv):
    """Starts the real server with the stand-ins (so file lists are valid) and writes example_workflows/."""
    sys.path.insert(0, os.path.dirname(HERE))
    from harness import standins
    from harness.server import ComfyServer

    root = argv[1]
    server = ComfyServer(root)
    standins.link_into(standins.ensure(root), server.models_dir)
    with server:
        info = server.get("/object_info")
    for name in write_all(info):
        print("wrote", workflow_path(name))
    readme = os.path.join(PACK_DIR, "README.md")
    with open(readme) as f:
        text = f.read()
    with open(readme, "w") as f:
        f.write(readme_with_table(text))
    print("wrote the workflow table in", readme)


if __name__ == "__main__":
    main(sys.argv)
