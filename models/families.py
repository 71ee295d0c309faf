"""The base-model family vocabulary, one home for the pure code and the glue.

Family ids are the glue's names of ComfyUI model configs (runtime/model_family.py tells which a
MODEL is); titles are what messages show; the text-context width of cross-attention tells an
SD base from a weight file (768 SD1.x, 1024 SD2.x, 2048 SDXL).
"""

TITLES = {
    "sd15": "SD1.5",
    "sd21": "SD2.x",
    "sdxl": "SDXL",
    "svd": "SVD (Stable Video Diffusion)",
    "sd3": "SD3 / SD3.5",
    "flux": "Flux",
}

FAMILY_BY_CONTEXT_WIDTH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}


def family_title(family):
    return TITLES.get(family, family)


def family_of_context_width(width):
    """"sd15" / "sd21" / "sdxl" for a cross-attention context width, or None."""
    return FAMILY_BY_CONTEXT_WIDTH.get(int(width))


def base_of_context_width(width):
    """The title ("SD1.5" / "SD2.x" / "SDXL") for a context width, or "" when unknown."""
    family = family_of_context_width(width)
    return family_title(family) if family else ""
