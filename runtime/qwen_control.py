"""MIControlNet on Qwen-Image: the stock ControlNets applied with Apply ControlNet (InstantX, Qwen-Image
2512 Fun) balanced alone, or together with the DiffSynth model-patch controls the MODEL carries
(docs/mi_controlnet.md, "Qwen-Image").

Core's Qwen-Image forward, after double block i (or the block replacement there), first calls the
call's ``"double_block"`` patches in list order (DiffSynth controls add their residual there) and
then adds ``control["input"][i]`` (the chained ControlNets' sum) to the first image tokens. The
ControlNets' residuals do not depend on the features, so both kinds meet at the same point: the
image tokens after block i.

MI Balanced Control's ``BalancedControl`` (runtime/mi.py) stashes each ControlNet's own residuals
for the call and makes core add nothing. ``QwenInjectionWrapper`` then rewrites each call's
double-block patch list (never the MODEL's): its Qwen-Image control patches (core's, XCtrl's Apply
node's, or an MI Balanced Model Patches entry's members) become one ``StashedPatches`` at the first
one's position, or, without any, ``StashedPatches`` is appended last, where core adds the
ControlNets. At each block it combines every DiffSynth term and every ControlNet residual for that
block with the MI Balanced Control node's settings and injects the result once. Mode ``sum`` adds
the DiffSynth terms one after the other and then the ControlNets' sum (folded oldest first, as
core's control_merge sums a chain), core's order and rounding.
"""
from . import call_patches, mi
from . import model_patch_control as mpc


class StashedPatches(mpc.BalancedModelPatches):
    """One call's Qwen-Image injection: the DiffSynth patches' terms, then the balanced ControlNets' residuals."""

    def __init__(self, members, stash):
        super().__init__(mpc.QWEN, members, stash["balance"])
        self.stash = stash

    def terms(self, kwargs):
        yield from super().terms(kwargs)
        i = kwargs["block_index"]
        if self.balance.mode != "sum":
            yield from self.stash.at("input", i)
        elif i < len(self.stash["input"]):  # core adds the chain's sum (folded oldest first) in one addition
            yield self.stash["input"][i]


def rewrite(patches, transformer_options):
    """The call's double-block patch list with its Qwen-Image controls and the stashed ControlNets as one entry."""
    members = [m for m, kind in mpc.members_in(patches) if kind == mpc.QWEN]
    entry = StashedPatches(members, transformer_options[mi.STASH])
    out, placed = mpc.put_in_place(patches, entry, mpc.QWEN)
    return out if placed else out + [entry]


class QwenInjectionWrapper(call_patches.RewritePatchListPerCall):
    """APPLY_MODEL wrapper of a balanced Qwen-Image MODEL (calls carrying a balanced stash only)."""

    def __init__(self):
        super().__init__("double_block", rewrite, lambda to: to.get(mi.STASH) is not None)


def check_mix(model, node):
    """The number of Qwen-Image DiffSynth control patches on ``model`` (joining the balance), after
    the checks of MI Balanced Model Patches (family, width, support)."""
    kind, members = mpc.check_family(model, node)
    return len(members) if kind == mpc.QWEN else 0
