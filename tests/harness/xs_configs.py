"""Tiny ControlNet-XS configurations for the pure tests of the network (fixtures: they use the
pack's XSConfig; the reference they are checked against is harness/xs_reference.py)."""
from harness.random_weights import random_tensors
from xctrl.models.controlnet_xs_keys import XSConfig

# SDXL-like (3 levels, 9 input blocks): linear projections, learned time embedding. Control
# norm group counts 4, 8, 12 (one channel per group) and 24 (48 and 72 channels: several
# channels per group; with one channel per group a norm cancels the per-channel time embedding,
# so widths like 48 are needed to see it).
TINY_XL = XSConfig(family="sdxl", ctrl_channels=(4, 8, 48), base_channels=(8, 16, 24), transformer_depth=(0, 1, 2),
                   transformer_depth_middle=1, num_heads=(0, 2, 3), num_heads_middle=3, context_dim=16,
                   use_linear_projection=True, learned_time_embedding=True, model_channels=8, time_embed_dim=16)
# SD-like (4 levels, 12 input blocks): 1x1-conv projections, no learned time embedding; widths
# 40 (20 groups) and 56 (28 groups) at the lower levels.
TINY_SD = XSConfig(family="sd", ctrl_channels=(4, 4, 40, 40), base_channels=(8, 8, 16, 16), transformer_depth=(1, 1, 1, 0),
                   transformer_depth_middle=1, num_heads=(1, 2, 2, 0), num_heads_middle=2, context_dim=12,
                   use_linear_projection=False, learned_time_embedding=False, model_channels=8, time_embed_dim=16)
TINY = {"xl": TINY_XL, "sd": TINY_SD}


def randomize(net, seed=0):
    """The network with the tests' seeded random weights (harness/random_weights.py)."""
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    net.load_state_dict(random_tensors(shapes, seed, gain=0.5, spread=0.2))
    return net
