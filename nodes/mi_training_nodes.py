"""MIControlNet's training data and measurements: Silent Signal Balance, Silent Total Variation,
Cycle Consistency (docs/mi_training.md; the work is in runtime/mi_training_data.py)."""
from comfy_api.latest import io

from ..runtime import mi_training_data as md
from .schema import node_schema

CATEGORY = "XCtrl/MIControlNet"


class SilentSignalBalance(io.ComfyNode):
    """MIControlNet's balanced training data: per (image, condition) pair a random subset of the image's segments
    keeps its condition and the rest of the condition is made silent (empty), while the image keeps its detail
    there, so a control trained on it learns that an empty condition does not mean a flat image. Segments come
    from the masks (one label map per image, or k masks per image) or, without masks, from colour clusters of
    the image or a grid. Seeded. Put it in front of Train ControlNeXt: images -> VAE Encode -> latents,
    conditions -> images."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_SilentSignalBalance", md.BALANCE_NODE, CATEGORY, inputs=[
            io.Image.Input("images", tooltip="The training (target) images; passed through unchanged."),
            io.Image.Input("conditions", tooltip="Their condition images (canny, HED, pose...), same order and size."),
            io.Float.Input("keep_rate", default=0.5, min=0.0, max=1.0, step=0.01,
                           tooltip="Chance that a segment keeps its condition (each segment drawn on its own)."),
            io.Int.Input("variants", default=1, min=1, max=64,
                         tooltip="Balanced pairs per input pair (each with its own draw); outputs are N x variants."),
            io.Int.Input("seed", default=0, min=0, max=2**63 - 1),
            io.Combo.Input("segmenter", options=list(md.SEGMENTERS), default="colour_clusters", tooltip=(
                "Without masks: colour_clusters = k-means on the blurred image's colours, each cluster split into "
                "its connected regions (follows objects and backgrounds); grid = segments x segments cells.")),
            io.Int.Input("segments", default=6, min=1, max=64,
                         tooltip="colour_clusters: number of colour clusters; grid: cells per side."),
            io.Float.Input("silent_value", default=0.0, min=0.0, max=1.0, step=0.01,
                           tooltip="The empty condition's value (0: black, as edge, pose and depth maps)."),
            io.Mask.Input("masks", optional=True, tooltip=(
                "Segments: one label map per image (each distinct value a segment), or k masks per image "
                "(image i's masks at i*k .. i*k+k-1; uncovered pixels one more segment). Same size as the images.")),
        ], outputs=[io.Image.Output(display_name="images"), io.Image.Output(display_name="conditions"),
            io.Mask.Output(display_name="kept")],
            is_input_list=True)

    @classmethod
    def execute(cls, images, conditions, keep_rate, variants, seed, segmenter, segments, silent_value, masks=None):
        return io.NodeOutput(*md.balance(images, conditions, masks, keep_rate, variants, seed, segmenter, segments,
                                         silent_value))




def silent_region_inputs(radius):
    """The generated images, their condition, and how the condition's silent region is read."""
    return [
        io.Image.Input("image", tooltip="The generated images."),
        io.Image.Input("condition", tooltip="The condition they were generated with (one, or one per image)."),
        io.Float.Input("threshold", default=0.04, min=0.0, max=1.0, step=0.01,
                       tooltip="A condition pixel is active when its brightest channel exceeds this (0-1)."),
        io.Int.Input("radius", default=radius, min=0, max=256,
                     tooltip="Pixels within this distance of an active condition pixel are not silent."),
    ]


class SilentTotalVariation(io.ComfyNode):
    """MIControlNet's measurement 'total variance under silent control signals': the total variation of the
    generated image inside the condition's silent region (where the condition is empty), per neighbouring
    pixel pair and channel (0-1 scale). Higher = more detail generated where the condition says nothing."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_SilentTotalVariation", md.TV_NODE, CATEGORY, inputs=[
            *silent_region_inputs(radius=2),
            io.Mask.Input("silent_mask", optional=True, tooltip="The silent region itself (1 = silent), instead of "
                          "the one read from the condition (e.g. Silent Signal Balance's kept, inverted)."),
        ], outputs=[io.Float.Output(display_name="total_variation"), io.String.Output(display_name="report"),
            io.Mask.Output(display_name="silent_region")],
            is_output_node=True)

    @classmethod
    def execute(cls, image, condition, threshold, radius, silent_mask=None):
        value, text, silent = md.total_variation_report(image, condition, threshold, radius, silent_mask)
        return io.NodeOutput(value, text, silent, ui={"text": [text]})


class CycleConsistency(io.ComfyNode):
    """MIControlNet's cycle consistency: the mean L1 distance (0-1 scale, per pixel and channel) between the
    condition and the condition extracted from the generated image, outside the condition's silent region.
    Lower = the control was followed more closely. Extracts canny itself (lllyasviel's annotator, the
    thresholds below) unless an extracted condition from another preprocessor is connected."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_CycleConsistency", md.CYCLE_NODE, CATEGORY, inputs=[
            *silent_region_inputs(radius=0),
            io.Int.Input("low_threshold", default=100, min=0, max=255, tooltip="Canny's low threshold."),
            io.Int.Input("high_threshold", default=200, min=0, max=255, tooltip="Canny's high threshold."),
            io.Image.Input("extracted", optional=True, tooltip="The condition extracted from the generated images by "
                           "another preprocessor node (HED, depth, pose...); canny is not run then."),
            io.Mask.Input("silent_mask", optional=True, tooltip="The silent region itself (1 = silent)."),
        ], outputs=[io.Float.Output(display_name="l1"), io.String.Output(display_name="report"),
            io.Image.Output(display_name="extracted")],
            is_output_node=True)

    @classmethod
    def execute(cls, image, condition, threshold, radius, low_threshold, high_threshold, extracted=None, silent_mask=None):
        value, text, extracted = md.cycle_consistency_report(image, condition, threshold, radius, low_threshold,
                                                             high_threshold, extracted, silent_mask)
        return io.NodeOutput(value, text, extracted, ui={"text": [text]})


NODES = [SilentSignalBalance, SilentTotalVariation, CycleConsistency]
