"""The example workflows in API terms: node id -> (class_type, inputs, title), where an input is a
widget value or a link ``[node_id, output_slot]``; widgets left out get the node's default. Also
their titles (the template names), the README summaries, and which need newer ComfyUI nodes."""
from .files import model_files, rename_note, source_repo

IMAGE = "example.png"  # ships in ComfyUI/input/
POSE_VIDEO = "pose_video.mp4"  # the user's driving video, in ComfyUI/input/
TRAINING_FOLDER = "controlnext_training"  # ComfyUI/input/<this>: training images with captions (name.png + name.txt)
NEGATIVE = "lowres, blurry, bad anatomy, extra limbs, watermark, text"


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



def _note(graph, text):
    """A note with the workflow's text, then every model file it loads: where it goes, where from."""
    files = [f"models/{folder}/{file}  ({source_repo(url)}" + (f"; {rename_note(file, url)}" if rename_note(file, url) else "")
             + ")" for folder, file, url in model_files(graph)]
    head = "Files (the missing-models list offers the model files; models/annotators/ files download on a first run online):"
    return {"note": ("Note", {"text": text + "\n\n" + head + "\n" + "\n".join(files)},
                     "Files and notes")}


def controlnext_sd15_pose():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Person photo (pose source)"),
         "pose": ("XCtrl_DWPose", {"image": ["image", 0], "resolution": 512, "draw_hands": False, "draw_face": False}, None),
         "preview": ("PreviewImage", {"images": ["pose", 0]}, "Pose"),
         "cnx": ("XCtrl_LoadControlNeXt", {"control_file": "controlnext_sd15_deepfashion_multiview_controlnet.safetensors",
                                           "unet_weights": "controlnext_sd15_deepfashion_multiview_unet.safetensors"}, None),
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
         "cnx": ("XCtrl_LoadControlNeXt", {"control_file": f"controlnext_sdxl_{name}_controlnet.safetensors",
                                           "unet_weights": f"controlnext_sdxl_{name}_unet.safetensors"}, None),
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
                                     "crop": "center"}, "Reference cropped 576x1024"),
         "video": ("LoadVideo", {"file": POSE_VIDEO}, "Driving video (poses)"),
         "frames": ("GetVideoComponents", {"video": ["video", 0]}, None),
         "clip_frames": ("ImageFromBatch", {"image": ["frames", 0], "batch_index": 0, "length": driving_frames},
                         f"Driving frames 0-{driving_frames - 1}"),
         "ref_pose": ("XCtrl_DWPose", {"image": ["ref_crop", 0], "resolution": 512}, "Reference pose"),
         "poses": ("XCtrl_DWPose", {"image": ["clip_frames", 0], "resolution": 512, "frame_stride": 2},
                   "Poses of every 2nd frame"),
         "render": ("XCtrl_RenderPose", {"pose_keypoint": ["poses", 1], "style": "controlnext_svd_v2", "width": SVD_W,
                                         "height": SVD_H, "reference_pose": ["ref_pose", 1], "prepend_reference": True},
                    f"Reference pose + {frames - 1} aligned"),
         "preview": ("PreviewImage", {"images": ["render", 0]}, "Pose frames"),
         "cnx": ("XCtrl_LoadControlNeXt", {"control_file": "controlnext-svd_v2-controlnet-fp16.safetensors",
                                           "unet_weights": "none"}, None),
         "apply": ("XCtrl_ApplyControlNeXt", {"model": ["unet", 0], "controlnext": ["cnx", 0],
                                              "image": ["render", 0], "strength": 1.0}, None),
         "cond": ("XCtrl_SVDReferenceConditioning", {"clip_vision": ["ckpt", 1], "init_image": ["ref_crop", 0], "vae": ["ckpt", 2],
                                                     "width": SVD_W, "height": SVD_H, "video_frames": frames,
                                                     "motion_bucket_id": 128, "fps": 7, "augmentation_level": 0.02, "seed": 42},
                  "SVD conditioning (reference)")}
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


def _controlnet_xs(ckpt, hint, preview_title, control_file, size, prompt, prefix, steps, cfg, note):
    """Load Image -> a preprocessor (hint: its node id and inputs) -> Apply ControlNet-XS on a checkpoint."""
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": ckpt}, None),
         "image": ("LoadImage", {"image": IMAGE}, "Source image"),
         "hint": (hint[0], {"image": ["image", 0], **hint[1]}, None),
         "preview": ("PreviewImage", {"images": ["hint", 0]}, preview_title),
         "xs": ("XCtrl_LoadControlNetXS", {"control_file": control_file}, None),
         "apply": ("XCtrl_ApplyControlNetXS", {"model": ["ckpt", 0], "controlnet_xs": ["xs", 0], "image": ["hint", 0],
                                              "strength": 1.0}, None),
         "latent": ("EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, None)}
    g.update(_sd_text(["ckpt", 1], prompt))
    g.update(_sample_and_save(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0], ["ckpt", 2], prefix, steps, cfg))
    g.update(_note(g, note))
    return g


def controlnet_xs_sdxl_depth():
    return _controlnet_xs(
        "sd_xl_base_1.0.safetensors", ("XCtrl_DepthAnythingV2", {"render": "grey"}), "Depth",
        "sdxl_encD_depth_48m.safetensors", 1024, "a futuristic city street at dusk, neon signs, photo",
        "xctrl/controlnet_xs_sdxl_depth", 30, 6.0,
        "ControlNet-XS SDXL depth: the authors' 48M-parameter depth model.\n"
        "Depth: Depth Anything V2 Small, grey, white = near. The canny models (sdxl_encD_canny_48m / _20m) "
        "work the same way with the Canny node.")


def controlnet_xs_sd21_canny():
    return _controlnet_xs(
        "v2-1_512-ema-pruned.safetensors",
        ("XCtrl_Canny", {"mode": "fixed", "low_threshold": 100, "high_threshold": 250}), "Edges",
        "sd21_encD_canny_14m.ckpt", 512, "a stone bridge over a river in autumn, photo",
        "xctrl/controlnet_xs_sd21_canny", 30, 7.0,
        "ControlNet-XS SD2.1 canny on SD2.1-base 512 (eps): the authors' 14M-parameter canny model "
        "(sd21_encD_depth_14m.ckpt works the same way with a depth map; the pickle is read without running "
        "code in it; diffusers' adapter files load too).\n"
        "Canny 100 / 250, as the authors' examples.")


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


def _canny_depth_sources():
    """Two Load Image nodes and their canny (100 / 200) and depth (grey) maps."""
    return {"image_canny": ("LoadImage", {"image": IMAGE}, "Edge source"),
            "image_depth": ("LoadImage", {"image": IMAGE}, "Depth source"),
            "canny": ("XCtrl_Canny", {"image": ["image_canny", 0], "mode": "fixed", "low_threshold": 100,
                                      "high_threshold": 200}, None),
            "depth": ("XCtrl_DepthAnythingV2", {"image": ["image_depth", 0], "render": "grey"}, None)}


def _canny_depth_controlnets(files, positive, strength, vae):
    """Two stock ControlNets (canny, depth files) applied one after the other with core's Apply ControlNet."""
    def apply(kind, positive, negative):
        return ("ControlNetApplyAdvanced", {"positive": positive, "negative": negative, "control_net": [f"cn_{kind}", 0],
                                            "image": [kind, 0], "strength": strength, "start_percent": 0.0,
                                            "end_percent": 1.0, "vae": vae}, f"Apply ControlNet ({kind})")
    return {"cn_canny": ("ControlNetLoader", {"control_net_name": files[0]}, None),
            "cn_depth": ("ControlNetLoader", {"control_net_name": files[1]}, None),
            "apply_canny": apply("canny", positive, ["neg", 0]),
            "apply_depth": apply("depth", ["apply_canny", 0], ["apply_canny", 1])}


def mi_sd35_canny_depth():
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "sd3.5_large.safetensors"}, "SD3.5 Large (MMDiT + VAE)"),
         "clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sd3"}, None),
         **_canny_depth_sources(),
         **_canny_depth_controlnets(("sd3.5_large_controlnet_canny.safetensors", "sd3.5_large_controlnet_depth.safetensors"),
                                    ["pos", 0], 0.8, ["ckpt", 2]),
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
         **_canny_depth_sources(),
         "guided": ("FluxGuidance", {"conditioning": ["pos", 0], "guidance": 3.5}, None),
         **_canny_depth_controlnets(("flux-canny-controlnet-v3.safetensors", "flux-depth-controlnet-v3.safetensors"),
                                    ["guided", 0], 0.7, ["vae", 0]),
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


def _qwen_image_2512():
    """Qwen-Image 2512's model (shift 3.1, as ComfyUI's templates), text encoder and VAE."""
    return {"unet": ("UNETLoader", {"unet_name": "qwen_image_2512_fp8_e4m3fn.safetensors", "weight_dtype": "default"},
                     "Qwen-Image 2512"),
            "clip": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                                    "device": "default"}, None),
            "vae": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}, None),
            "shift": ("ModelSamplingAuraFlow", {"model": ["unet", 0], "shift": 3.1}, None)}


def mi_qwen_image_canny_depth():
    """Qwen-Image 2512 with DiffSynth's canny and depth ControlNets (model patches), balanced."""
    g = {**_qwen_image_2512(),
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


def mi_qwen_image_fun_canny_depth():
    """Qwen-Image 2512 with the 2512 Fun ControlNet Union applied twice through core's Apply
    ControlNet (canny, depth), balanced (ComfyUI's own template's settings: shift 3.1, 50 steps,
    cfg 4, euler/simple, 1328 x 1328, strength 1)."""
    g = {**_qwen_image_2512(),
         "union": ("ControlNetLoader", {"control_net_name": "Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors"},
                   "Fun ControlNet Union"),
         "image": ("LoadImage", {"image": IMAGE}, "Control source"),
         "canny": ("XCtrl_Canny", {"image": ["image", 0], "mode": "fixed", "low_threshold": 100, "high_threshold": 200}, None),
         "depth": ("XCtrl_DepthAnythingV2", {"image": ["image", 0], "render": "grey"}, None),
         "apply_canny": ("ControlNetApplyAdvanced", {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["union", 0],
                                                     "image": ["canny", 0], "strength": 1.0, "start_percent": 0.0,
                                                     "end_percent": 1.0, "vae": ["vae", 0]}, "Apply ControlNet (canny)"),
         "apply_depth": ("ControlNetApplyAdvanced", {"positive": ["apply_canny", 0], "negative": ["apply_canny", 1],
                                                     "control_net": ["union", 0], "image": ["depth", 0], "strength": 1.0,
                                                     "start_percent": 0.0, "end_percent": 1.0, "vae": ["vae", 0]},
                         "Apply ControlNet (depth)"),
         "mi": ("XCtrl_MIBalancedControl", {"model": ["shift", 0], "positive": ["apply_depth", 0], "negative": ["apply_depth", 1],
                                            "mode": "paper", "granularity": "layer", "cap": 20.0}, None),
         "latent": ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1}, None),
         "stats": ("XCtrl_MILambdaStats", {"positive": ["mi", 1], "samples": ["sampler", 0]}, None)}
    g.update(_sd_text(["clip", 0], "a stone bridge over a river in autumn, photo"))
    g.update(_sample_and_save(["mi", 0], ["mi", 1], ["mi", 2], ["latent", 0], ["vae", 0], "xctrl/mi_qwen_image_fun_canny_depth",
                              50, 4.0, sampler="euler", scheduler="simple"))
    g.update(_note(g, "Qwen-Image 2512 with the 2512 Fun ControlNet Union (one file, one Apply ControlNet per type: "
                      "canny, then depth), balanced by MI Balanced Control instead of summed. Core applies a Fun "
                      "ControlNet with the square root of its strength. Needs a ComfyUI whose Load ControlNet reads "
                      "the 2512 Fun ControlNet (0.33.0 tested; 0.8.0 cannot load it).\n"
                      "mode sum = core's plain addition, to compare."))
    return g


def controlnext_sd15_train_canny():
    """Train a canny ControlNeXt on a folder of captioned images (the conditions made from the images
    by the Canny node, so they line up with them), then use it."""
    g = {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}, None),
         "dataset": ("LoadImageTextDataSetFromFolder", {"folder": TRAINING_FOLDER}, "Training images + captions"),
         "encode": ("MakeTrainingDataset", {"images": ["dataset", 0], "vae": ["ckpt", 2], "clip": ["ckpt", 1],
                                            "texts": ["dataset", 1]}, "Latents + caption conditionings"),
         "conditions": ("XCtrl_Canny", {"image": ["dataset", 0], "mode": "fixed", "low_threshold": 100,
                                        "high_threshold": 200}, "Condition of each image"),
         "empty": ("CLIPTextEncode", {"text": "", "clip": ["ckpt", 1]}, "Empty prompt (20 %)"),
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
    "mi_qwen_image_fun_canny_depth": mi_qwen_image_fun_canny_depth,
}
# Workflows that need what only newer ComfyUI versions have (the tests skip them elsewhere): node
# types, or "module:name" for a part of core that no node type shows (the class core's Load
# ControlNet builds from a file: older releases list the file, then cannot load it).
REQUIRES = {"controlnext_sd15_train_canny": ("LoadImageTextDataSetFromFolder", "MakeTrainingDataset"),
            "mi_zimage_pose_depth": ("ModelPatchLoader", "ModelSamplingAuraFlow", "ConditioningZeroOut"),
            "mi_qwen_image_fun_canny_depth": ("comfy.controlnet:QwenFunControlNet",)}
# The oldest tested ComfyUI release that has them: said in the template's title, since ComfyUI
# offers every file of example_workflows/ on any version.
MIN_COMFYUI = {"controlnext_sd15_train_canny": "0.8", "mi_zimage_pose_depth": "0.8", "mi_qwen_image_fun_canny_depth": "0.33"}
# Workflows the tests do not run (their models are PLACEHOLDERS), with the reason.
NOT_RUN = {"mi_flux_canny_depth": "Flux stand-ins would need ComfyUI's full-size T5-XXL (4.7B parameters); MI on Flux "
                                  "is tested on a tiny Flux in test_mi_dit.py",
           "mi_zimage_pose_depth": "core builds Z-Image and its control patch at full width (no small stand-ins); tested on "
                                   "tiny models in test_model_patch_mi.py",
           "mi_qwen_image_canny_depth": "core builds Qwen-Image and its control patches at full width (no small stand-ins); "
                                        "tested on tiny models in test_model_patch_mi.py",
           "mi_qwen_image_fun_canny_depth": "core builds Qwen-Image at full width and its text encoder at 7B parameters (no "
                                            "small stand-ins); MI on the 2512 Fun ControlNet is tested on tiny models in "
                                            "test_mi_qwen_controlnets.py"}

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
    "controlnext_sd15_train_canny": "Train ControlNeXt for canny on SD1.5, then use it (needs ComfyUI 0.8 or newer)",
    "mi_zimage_pose_depth": "MIControlNet Z Image Turbo Fun ControlNet Union balanced pose and depth, pose masked (needs ComfyUI 0.8 or newer)",
    "mi_qwen_image_canny_depth": "MIControlNet Qwen Image 2512 balanced DiffSynth canny and depth",
    "mi_qwen_image_fun_canny_depth": "MIControlNet Qwen Image 2512 Fun ControlNet balanced canny and depth (needs ComfyUI 0.33 or newer)",
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
    "controlnet_xs_sd21_canny": "Canny -> ControlNet-XS SD2.1 (the authors' 14M canny model)",
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
    "mi_qwen_image_fun_canny_depth": "Canny + Depth Anything V2 -> the 2512 Fun ControlNet Union through stock Load ControlNet "
                                     "+ Apply ControlNet (canny, then depth) -> MI Balanced Control (ComfyUI 0.33 or newer)",
}




def files_of(name):
    return model_files(WORKFLOWS[name]())

