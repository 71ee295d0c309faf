"""Adding patches and wrappers to one model call's ``transformer_options`` (conditioning-level
controls), never to the dicts the MODEL shares with other calls and clones: every level that is
changed is copied first."""


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


def add_wrapper(transformer_options, wrapper_type, key, fn):
    wrappers = dict(transformer_options.get("wrappers", {}))
    wrappers[wrapper_type] = dict(wrappers.get(wrapper_type, {}))
    wrappers[wrapper_type][key] = list(wrappers[wrapper_type].get(key, [])) + [fn]
    transformer_options["wrappers"] = wrappers
