"""Seeded random weights for every key -> shape layout the tests and the benchmark build.

One rule for all, scaled so activations stay O(1) through deep networks: matrices and
convolution kernels N(0, gain^2 / fan_in), 1-D weights (norms) 1 + spread * N(0, 1), biases and
other tensors 0.1 * N(0, 1); ControlNeXt's learned ``scale`` is ``learned_scale`` and a
``scale_list`` is ones.
"""
import math

import torch

from .layouts import load_layout


def random_tensors(shapes, seed=0, dtype=torch.float32, gain=1.0, spread=0.1, learned_scale=0.7):
    """{name: shape} -> {name: tensor}, in sorted key order (so the draw does not depend on dict order)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        shape = tuple(shape)
        if key == "scale":
            t = torch.tensor(learned_scale, dtype=torch.float64)
        elif key == "scale_list":
            t = torch.ones(shape, dtype=torch.float64)
        elif key.endswith("weight") and len(shape) >= 2:
            t = torch.randn(shape, generator=g, dtype=torch.float64) * (gain / math.sqrt(math.prod(shape[1:])))
        elif key.endswith("weight"):
            t = 1 + spread * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            t = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        out[key] = t.to(dtype)
    return out


def random_layout(layout_file, seed=0, dtype=torch.float32, resize=None, **kw):
    """Random tensors with a released file's layout (tests/data/checkpoint_layouts/<layout_file>).

    ``resize``: {key prefix: leading dimension} to change, e.g. a ControlNeXt's output width.
    """
    shapes = {k: list(s) for k, s in load_layout(layout_file)["keys"].items()}
    for prefix, dim in (resize or {}).items():
        for k, s in shapes.items():
            if k.startswith(prefix):
                s[0] = dim
    return random_tensors(shapes, seed, dtype, **kw)
