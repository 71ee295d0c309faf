"""Adding patches and wrappers to one model call's ``transformer_options``, never to the dicts
the MODEL shares with other calls and clones: every level that is changed is copied first.

Conditioning-level controls add theirs from ``get_control``; MODEL-level block replacements
(MI balancing on DiT models, ControlNeXt on SD3) from an APPLY_MODEL wrapper
(:class:`ReplaceBlocksPerCall`), so they wrap whatever replacement of the block the call carries,
whichever order the packs were applied in (docs/comfyui_hooks.md, "Block replacements")."""
import uuid

import comfy.patcher_extension as pe

# A runner declares its hooks once, as (what, where, object), and they go either on a MODEL
# (``on_model``) or on one model call (``on_call``):
#   (PATCH, patch list name, patch), (WRAPPER, wrapper type, function),
#   (REPLACE, (kind, block key), make(the replacement already there or None)).
PATCH, WRAPPER, REPLACE = "patch", "wrapper", "replace"


def on_model(model, uid, hooks, wanted=None):
    """The hooks on a cloned MODEL; block replacements chained per call by an APPLY_MODEL wrapper
    (applied in calls where ``wanted(transformer_options)`` holds)."""
    for what, where, obj in hooks:
        if what == PATCH:
            model.set_model_patch(obj, where)
        elif what == WRAPPER:
            model.add_wrapper_with_key(where, uid, obj)
        else:
            kind, key = where
            model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, uid,
                                       ReplaceBlocksPerCall(kind, [key], lambda _key, previous, make=obj: make(previous), wanted))


def on_call(transformer_options, uid, hooks):
    """The hooks on one model call's transformer_options only (conditioning-level control)."""
    for what, where, obj in hooks:
        if what == PATCH:
            add_patch(transformer_options, where, obj)
        elif what == WRAPPER:
            add_wrapper(transformer_options, where, uid, obj)
        else:
            wrap_replace(transformer_options, *where, obj)


def add_patch(transformer_options, name, patch):
    patches = dict(transformer_options.get("patches", {}))
    patches[name] = list(patches.get(name, [])) + [patch]
    transformer_options["patches"] = patches


def wrap_replace(transformer_options, kind, key, make):
    """Block replacement ``key`` becomes ``make(the replacement there, or None)``: another pack's
    replacement of the same block is chained, not dropped."""
    replace = dict(transformer_options.get("patches_replace", {}))
    replace[kind] = dict(replace.get(kind, {}))
    replace[kind][key] = make(replace[kind].get(key))
    transformer_options["patches_replace"] = replace


def wrap_replaces(transformer_options, kind, keys, make):
    """``wrap_replace`` for several blocks at once: ``make(key, the replacement there or None)``."""
    replace = dict(transformer_options.get("patches_replace", {}))
    replace[kind] = dict(replace.get(kind, {}))
    for key in keys:
        replace[kind][key] = make(key, replace[kind].get(key))
    transformer_options["patches_replace"] = replace


class PerCall:
    """APPLY_MODEL wrapper changing each model call's transformer_options for which
    ``wanted(transformer_options)`` holds (``change``), once per call; the MODEL's own dicts are
    never changed, so what another pack adds to the MODEL later (or added earlier) is kept."""

    DONE = "xctrl_blocks_replaced"  # per call: the wrappers already applied (a dict passed twice)

    def __init__(self, wanted=None):
        self.wanted = wanted
        self.token = uuid.uuid4().hex

    def __deepcopy__(self, memo):  # lives in model_options, which clones deep-copy: shared
        return self

    def change(self, transformer_options):
        raise NotImplementedError

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        to = transformer_options
        if isinstance(to, dict) and self.token not in to.get(self.DONE, ()) and (self.wanted is None or self.wanted(to)):
            self.change(to)
            to[self.DONE] = to.get(self.DONE, frozenset()) | {self.token}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


class ReplaceBlocksPerCall(PerCall):
    """In each wanted call, block ``key`` of ``kind`` becomes ``make(key, the call's replacement
    there or None)``: a replacement another pack put on the MODEL is the inner one, and runs."""

    def __init__(self, kind, keys, make, wanted=None):
        super().__init__(wanted)
        self.kind, self.keys, self.make = kind, tuple(keys), make

    def change(self, transformer_options):
        wrap_replaces(transformer_options, self.kind, self.keys, self.make)


class RewritePatchListPerCall(PerCall):
    """In each wanted call, patch list ``name`` becomes ``rewrite(the call's list, transformer_options)``
    (a new list; the call's other patch lists are kept)."""

    def __init__(self, name, rewrite, wanted=None):
        super().__init__(wanted)
        self.name, self.rewrite = name, rewrite

    def change(self, transformer_options):
        patches = dict(transformer_options.get("patches", {}))
        patches[self.name] = self.rewrite(list(patches.get(self.name, [])), transformer_options)
        transformer_options["patches"] = patches


def add_wrapper(transformer_options, wrapper_type, key, fn):
    wrappers = dict(transformer_options.get("wrappers", {}))
    wrappers[wrapper_type] = dict(wrappers.get(wrapper_type, {}))
    wrappers[wrapper_type][key] = list(wrappers[wrapper_type].get(key, [])) + [fn]
    transformer_options["wrappers"] = wrappers
