"""ControlNeXt and ControlNet-XS carried by conditioning (per prompt / per area), through
ComfyUI's own per-conditioning control slot (``cond["control"]``, a ControlBase chain).

ComfyUI batches into one model call only conds that carry the same control object, and asks
each call's control for its output right before the call (``get_control``, which receives that
call's ``transformer_options``). So a :class:`ConditioningControl` sees exactly the rows that
carry it: it lets its runner compute the call's control and add the runner's patches and
wrappers to that call alone (nodes/call_patches.py). Rows whose conds carry no control run
without it. Stock ControlNets chained before it keep working: their residuals are returned
as the output of the chain. (docs/comfyui_hooks.md, "Conditioning-level control".)

Under core's MultiGPU work units each device runs its own clone of the control
(``deepclone_multigpu``): it shares the runner (settings, schedule) and uses the runner's lane
of that device, a copy of the control network loaded there (nodes/control_runner.py).
"""
import comfy.controlnet

from . import hints


class ConditioningControl(comfy.controlnet.ControlBase):
    def __init__(self, runner, device=None):
        super().__init__()
        self.runner = runner  # shared by every copy (one module and one per-step cache per device)
        self.device = device  # None: the runner's own device; else the device of this MultiGPU clone
        self.base_model = None

    def copy(self):
        c = ConditioningControl(self.runner, self.device)
        self.copy_to(c)
        return c

    def deepclone_multigpu(self, load_device, autoregister=False):
        """Core's MultiGPU: this control for ``load_device``, with the runner's copy of the
        control network there (made once)."""
        self.runner.add_device(load_device)
        c = ConditioningControl(self.runner, load_device)
        self.copy_to(c)
        if autoregister:
            self.multigpu_clones[load_device] = c
        return c

    def get_models(self):
        return super().get_models() + [self.runner.lane(device=self.device).patcher]

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.base_model = model

    def cleanup(self):
        self.runner.release()
        super().cleanup()

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        try:
            self.runner.attach_to_call(self.base_model, x_noisy, t, transformer_options, self.device)
        except hints.HintBatchError as e:
            raise hints.HintBatchError(f"{self.runner.NODE}: {e}") from None
        return previous


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
