#!/usr/bin/env bash
# Runs the whole test suite: the pure-torch tests once, then the ComfyUI integration
# tests once per ComfyUI runtime found (COMFYUI_PATH=root1:root2, the ComfyUI this pack
# sits in, or ~/comfy/ComfyUI and ~/comfy/ComfyUI-*; with none, the three tested releases are
# fetched there when the network allows). Extra arguments go to pytest.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

ROOTS_OUT="$(comfyui_roots both)" || exit 2
mapfile -t ROOTS <<< "$ROOTS_OUT"
[ -z "${ROOTS[0]:-}" ] && ROOTS=()
setup_venv "${ROOTS[@]}"
[ "${#ROOTS[@]}" -gt 0 ] && ensure_chromium
PY="$VENV/bin/python"
RESULTS="$(mktemp -d)"
cd "$PACK_DIR"
# Real packs for the tiled-upscaling and distributed tests (they skip loudly without them).
export XCTRL_USDU_DIR="${XCTRL_USDU_DIR:-$(optional_pack ComfyUI_UltimateSDUpscale https://github.com/ssitu/ComfyUI_UltimateSDUpscale)}"
export XCTRL_DISTRIBUTED_DIR="${XCTRL_DISTRIBUTED_DIR:-$(optional_pack ComfyUI-Distributed https://github.com/robertvoy/ComfyUI-Distributed)}"

echo "=== pure-torch tests ==="
"$PY" -m pytest -c tests/pytest.ini --rootdir tests tests/pure -q --junitxml="$RESULTS/pure.xml" "$@"

if [ "${#ROOTS[@]}" -eq 0 ]; then
    echo "!!! ALL ComfyUI INTEGRATION TESTS ARE SKIPPED: $NO_COMFYUI !!!"
else
    i=0
    for ROOT in "${ROOTS[@]}"; do
        i=$((i + 1))
        echo "=== ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/comfyui_version.py") integration tests ($ROOT) ==="
        # The slow end-to-end workflow runs (real server, real frontend): primary runtime only.
        PRIMARY=$([ "$i" = 1 ] && echo 1 || echo 0)
        [ "$i" = 1 ] || echo "(workflow server and browser runs: primary ComfyUI only; workflow validation runs here too)"
        XCTRL_SERVER_WORKFLOWS="${XCTRL_SERVER_WORKFLOWS:-$PRIMARY}" XCTRL_FRONTEND_TESTS="${XCTRL_FRONTEND_TESTS:-$PRIMARY}" XCTRL_COMFYUI_ROOT="$ROOT" PYTHONPATH="$(root_pythonpath "$ROOT")" "$PY" -m pytest -c tests/pytest.ini --rootdir tests tests/integration -q --junitxml="$RESULTS/comfy$i.xml" "$@"
    done
fi

# One closing line over every run.
"$PY" "$PACK_DIR/scripts/sum_junit.py" "$RESULTS"/*.xml
