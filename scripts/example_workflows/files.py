"""Every model file the example workflows load: models folder, the name the loader lists, the
download URL. The stand-ins the tests link, the loaders' ``models`` properties (the frontend's
missing-models dialog), the notes nodes and the README table all come from ``MODELS``."""

HF = "https://huggingface.co"
PBIHAO = f"{HF}/Pbihao/ControlNeXt/resolve/main"
# Every model file a workflow loads: (models folder, name as the loader lists it) -> download URL.
# Names are flat (no folders) and unique: ComfyUI Desktop's downloader saves a file under the part
# of its name before the first "/", a browser under the URL's last part. Where the authors
# published a generic name (controlnet.safetensors, unet.safetensors) the browser's file must be
# renamed: the notes node and the README say so (``rename_note``).
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
    ("controlnet", "controlnext_sd15_deepfashion_multiview_controlnet.safetensors"):
        f"{PBIHAO}/ControlNeXt-SD1.5/deepfashion_multiview/controlnet.safetensors",
    ("controlnet", "controlnext_sd15_deepfashion_multiview_unet.safetensors"):
        f"{PBIHAO}/ControlNeXt-SD1.5/deepfashion_multiview/unet.safetensors",
    ("controlnet", "controlnext_sdxl_anime_canny_controlnet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/anime_canny/controlnet.safetensors",
    ("controlnet", "controlnext_sdxl_anime_canny_unet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/anime_canny/unet.safetensors",
    ("controlnet", "controlnext_sdxl_vidit_depth_controlnet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/vidit_depth/controlnet.safetensors",
    ("controlnet", "controlnext_sdxl_vidit_depth_unet.safetensors"): f"{PBIHAO}/ControlAny-SDXL/vidit_depth/unet.safetensors",
    ("controlnet", "controlnext-svd_v2-controlnet-fp16.safetensors"):
        f"{HF}/Kijai/ControlNeXt-SVD-V2-Comfy/resolve/main/controlnext-svd_v2-controlnet-fp16.safetensors",
    ("controlnet", "sdxl_encD_depth_48m.safetensors"): f"{HF}/CVL-Heidelberg/ControlNet-XS/resolve/main/sdxl_encD_depth_48m.safetensors",
    ("controlnet", "sd21_encD_canny_14m.ckpt"): f"{HF}/CVL-Heidelberg/ControlNet-XS/resolve/main/sd21_encD_canny_14m.ckpt",
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
    ("controlnet", "Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors"):
        f"{HF}/alibaba-pai/Qwen-Image-2512-Fun-Controlnet-Union/resolve/main/Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors",
}
# Files the tests can only list, not load: a stand-in of Flux needs ComfyUI's fixed T5-XXL (4.7B
# parameters), more than this machine holds next to everything else. The workflow that uses them
# is validated and opened in the browser, not run (MI on Flux is tested on a tiny Flux).
PLACEHOLDERS = {("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
                ("vae", "ae.safetensors"), ("controlnet", "flux-canny-controlnet-v3.safetensors"),
                ("controlnet", "flux-depth-controlnet-v3.safetensors")}
# Z-Image / Qwen-Image: core's loaders fix the real widths (3840 / 3072) of the models and their
# control patches (the 2512 Fun ControlNet's width is read from its file, but it runs only on the
# full-width model), so stand-ins would be full size; those are tested on tiny models built with
# the same classes (test_model_patch_mi.py, test_mi_qwen_controlnets.py).
PLACEHOLDERS |= {key for key in MODELS if key[1].startswith(("z_image", "qwen_", "Z-Image", "Qwen-Image"))}
MODEL_FOLDER = {name: folder for folder, name in MODELS}


def source_repo(url):
    """owner/name of a Hugging Face download URL."""
    return "/".join(url[len(HF) + 1:].split("/")[:2])



# The preprocessors' weight files (models/annotators; downloaded on a node's first run when online):
# file -> URL, and the files each preprocessor node reads (as runtime/annotator_models.py).
ANNOTATORS_FOLDER = "annotators"
ANNOTATORS = {
    "yolox_l.onnx": f"{HF}/yzd-v/DWPose/resolve/main/yolox_l.onnx",
    "dw-ll_ucoco_384.onnx": f"{HF}/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx",
    "depth_anything_v2_vits.pth": f"{HF}/depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth",
    "ControlNetHED.pth": f"{HF}/lllyasviel/Annotators/resolve/main/ControlNetHED.pth",
    "body_pose_model.pth": f"{HF}/lllyasviel/Annotators/resolve/main/body_pose_model.pth",
}
NODE_ANNOTATORS = {
    "XCtrl_DWPose": ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
    "XCtrl_DepthAnythingV2": ("depth_anything_v2_vits.pth",),
    "XCtrl_HED": ("ControlNetHED.pth",),
    "XCtrl_OpenPose": ("body_pose_model.pth",),
}


def downloaded_name(url):
    """The name a browser saves a download under: the URL's last part."""
    return url.rsplit("/", 1)[1]


def rename_note(name, url):
    """'' or, where the browser's download has another name than the workflow's, what to do."""
    saved = downloaded_name(url)
    return "" if saved == name else f"the download is called {saved}: rename it to {name}"


def node_files(cls, inputs):
    """[(folder, file name, url)] a node reads: the model files its widgets select, the
    preprocessor weights it needs."""
    out = [(MODEL_FOLDER[v], v, MODELS[MODEL_FOLDER[v], v]) for v in inputs.values()
           if isinstance(v, str) and v in MODEL_FOLDER]
    return out + [(ANNOTATORS_FOLDER, n, ANNOTATORS[n]) for n in NODE_ANNOTATORS.get(cls, ())]


def model_files(graph):
    """[(folder, file name, url)] of every file a graph loads, in graph order."""
    out = []
    for cls, inputs, _title in graph.values():
        for entry in node_files(cls, inputs):
            if entry not in out:
                out.append(entry)
    return out

