"""ControlNeXt and ControlNet-XS carried by conditioning (per prompt / per area), through
ComfyUI's own per-conditioning control slot (``cond["control"]``, a ControlBase chain).

ComfyUI batches into one model call only conds that carry the same control object, and asks
each call's control for its output right before the call (``get_control``, which receives that
call's ``transformer_options``). So a :class:`ConditioningControl` sees exactly the rows that
carry it: it lets its runner compute the call's control and add the runner's patches and
wrappers to that call alone (runtime/call_patches.py). Rows whose conds carry no control run
without it. Stock ControlNets chained before it keep working: their residuals are returned
as the output of the chain. (docs/comfyui_hooks.md, "Conditioning-level control".)

Tiled upscalers crop each control of a cond's chain to the tile (a ``copy()`` whose
``cond_hint_original`` they replace): that attribute is the runner's hint (and mask), and
setting it gives this copy a runner on the crop (docs/comfyui_hooks.md, "Tiled upscaling").

Under core's MultiGPU work units each device runs its own clone of the control
(``deepclone_multigpu``): it shares the runner (settings, schedule) and uses the runner's lane
of that device, a copy of the control network loaded there (runtime/control_runner.py).
"""
import comfy.controlnet

from . import batch_rows
from .model_family import family_title, model_signature


class ConditioningControl(comfy.controlnet.ControlBase):
    def __init__(self, runner, made_for=None, device=None):
        super().__init__()
        self.runner = runner  # shared by every copy (one module and one per-step cache per device)
        self.made_for = made_for  # model_signature of the MODEL given to the node
        self.device = device  # None: the runner's own device; else the device of this MultiGPU clone
        self.base_model = None
        self.checked = False  # the run's latent batch checked (at its first model call)

    @property
    def cond_hint_original(self):
        return self.runner.tiler_view()

    @cond_hint_original.setter
    def cond_hint_original(self, value):
        # None from ControlBase.__init__, the same view from ControlBase.copy_to: nothing to crop
        if value is None or value is self.cond_hint_original:
            return
        self.runner = self.runner.for_tile(value)

    def copy(self):
        c = ConditioningControl(self.runner, self.made_for, self.device)
        self.copy_to(c)
        return c

    def deepclone_multigpu(self, load_device, autoregister=False):
        """Core's MultiGPU: this control for ``load_device``, with the runner's copy of the
        control network there (made once)."""
        self.runner.add_device(load_device)
        c = ConditioningControl(self.runner, self.made_for, load_device)
        self.copy_to(c)
        if autoregister:
            self.multigpu_clones[load_device] = c
        return c

    def get_models(self):
        return super().get_models() + [self.runner.lane(device=self.device).patcher]

    def pre_run(self, model, percent_to_timestep_function):
        """Before sampling: the sampler's model must be the kind this control was set up for."""
        super().pre_run(model, percent_to_timestep_function)
        have = model_signature(model)
        if self.made_for is not None and have != self.made_for:
            raise ValueError(
                f"{self.runner.NODE}: the sampler's model is {_described(have)} but this control was set up for the "
                f"{_described(self.made_for)} connected to the node's model input: connect the MODEL you sample with "
                "to the node's model input too")
        self.base_model = model
        self.checked = False

    def cleanup(self):
        self.runner.release()
        super().cleanup()

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if not self.checked:  # the earliest point a conditioning's control sees the latent batch
            layout = batch_rows.BatchLayout(x_noisy.shape[0], transformer_options)
            self.runner.check_sampling((layout.latent_count(), *x_noisy.shape[1:]), None, layout.window is not None)
            self.checked = True
        try:
            self.runner.attach_to_call(self.base_model, x_noisy, t, transformer_options, self.device)
        except batch_rows.HintBatchError as e:
            raise batch_rows.HintBatchError(f"{self.runner.NODE}: {e}") from None
        return previous


def _described(signature):
    family, width = signature[0], signature[1] or signature[4]
    return f"{family_title(family)} model" + (f" ({width} channels wide)" if width else "")


def attach(positive, negative, model, runner):
    """positive/negative carrying the runner's control, made for the MODEL it was checked against."""
    return with_control(positive, negative, ConditioningControl(runner, model_signature(model.model)))


def with_control(positive, negative, control):
    """positive/negative with ``control`` at the end of each cond's control chain, as ComfyUI's
    Apply ControlNet does (one copy per distinct previous chain, so positive and negative that
    shared a chain share this one too and can run in one batch)."""
    copies = {}
    out = []
    for conditioning in (positive, negative):
        conds = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if previous not in copies:
                copies[previous] = control.copy().set_previous_controlnet(previous)
            options["control"] = copies[previous]
            options["control_apply_to_uncond"] = False
            conds.append([embedding, options])
        out.append(conds)
    return out[0], out[1]
