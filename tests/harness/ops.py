"""Layer factories that record what they build: a test gives them as ``ops`` and checks that
every layer with weights came from them (ComfyUI's casting ops must be able to stand in)."""
import types

from torch import nn


def recording_ops():
    """(ops, made): ``ops`` has Conv2d, Linear, GroupNorm, LayerNorm; ``made`` lists each layer built."""
    made = []

    def recording(base):
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        return Recorded

    ops = types.SimpleNamespace(**{n: recording(getattr(nn, n)) for n in ("Conv2d", "Linear", "GroupNorm", "LayerNorm")})
    return ops, made


def built_through(module, made):
    """Whether every submodule with its own parameters is one of ``made`` (the module itself aside)."""
    with_weights = [m for m in module.modules() if m is not module and list(m.parameters(recurse=False))]
    return bool(with_weights) and all(any(m is o for o in made) for m in with_weights)
