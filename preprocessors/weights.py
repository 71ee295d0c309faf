"""Loading a state dict into one of the preprocessor networks, exactly or not at all."""


def load_exact(net, state_dict, file_name):
    """Loads `state_dict` into `net` (strict: same keys, same shapes) and returns it in eval mode.

    Raises ValueError naming `file_name` when the layout differs, e.g. a wrong file was chosen.
    """
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The weights do not have the layout of {file_name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            "Is this the right file?"
        )
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"The weights do not have the shapes of {file_name}: {k} is {got}, expected {want}.")
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)
