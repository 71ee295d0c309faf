#!/usr/bin/env bash
# Starts ComfyUI with this pack loaded and prints the URL.
#   ./run_comfyui.sh                                    (ComfyUI found or fetched, see scripts/common.sh)
#   COMFYUI_PATH=/path/to/ComfyUI ./run_comfyui.sh      (or: the pack inside ComfyUI/custom_nodes/)
# Options: PORT (default 8188), LISTEN (default 127.0.0.1); extra arguments go to ComfyUI's main.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

ROOTS_OUT="$(comfyui_roots primary)" || exit 2
[ -n "$ROOTS_OUT" ] || die "$NO_COMFYUI"
mapfile -t ROOTS <<< "$ROOTS_OUT"
ROOT="${ROOTS[0]}"
setup_venv "$ROOT"

ARGS=(--listen "${LISTEN:-127.0.0.1}" --port "${PORT:-8188}" --disable-auto-launch)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "No CUDA GPU visible to torch: running ComfyUI on the CPU (slow)."
    ARGS+=(--cpu)
fi

case "$PACK_DIR" in
    "$ROOT"/custom_nodes/*) ;;  # ComfyUI loads it from its own custom_nodes
    *)
        # Load the pack through an extra custom_nodes folder next to the venv (one, reused: nothing
        # is left behind per start); ComfyUI's own folders stay untouched.
        EXTRA="$(dirname "$VENV")/comfyui-extra"
        mkdir -p "$EXTRA/custom_nodes"
        ln -sfn "$PACK_DIR" "$EXTRA/custom_nodes/xctrl-nodes"
        printf 'xctrl:\n  base_path: %s\n  custom_nodes: custom_nodes\n' "$EXTRA" > "$EXTRA/extra_model_paths.yaml"
        ARGS+=(--extra-model-paths-config "$EXTRA/extra_model_paths.yaml")
        ;;
esac

echo "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/comfyui_version.py") at $ROOT with the XCtrl pack"
echo "Open http://${LISTEN:-127.0.0.1}:${PORT:-8188} once it says 'To see the GUI go to'."
cd "$ROOT"
export PYTHONPATH="$(root_pythonpath "$ROOT")"
exec "$VENV/bin/python" main.py "${ARGS[@]}" "$@"
