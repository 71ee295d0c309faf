# Shared by run_comfyui.sh and run_tests.sh: find ComfyUI, build the virtual environment.
# Sourced, not executed. Everything it installs goes into one venv outside the repo
# (default ~/.cache/xctrl-nodes/venv, override with XCTRL_VENV), reused while the
# requirement files it was built from are unchanged.

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XCTRL_VENV:-$HOME/.cache/xctrl-nodes/venv}"
PYTHON_BIN="${PYTHON:-python3}"
# torch 2.14.1 / torchvision 0.29.1 is the pair tested here; set TORCH_SPEC to use another.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

die() { echo "ERROR: $*" >&2; exit 2; }

is_comfyui() { [ -f "$1/main.py" ] && [ -f "$1/nodes.py" ] && [ -d "$1/comfy" ]; }

# Prints one ComfyUI root per line, in order of preference.
#   COMFYUI_PATH=root[:root...]    explicit; every entry must be a ComfyUI root
#   otherwise: the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>),
#   then comfy-cli's default workspace ~/comfy/ComfyUI and its documented
#   siblings ~/comfy/ComfyUI-* (e.g. ~/comfy/ComfyUI-0.3.64 for the second version).
find_comfyui_roots() {
    local roots=() r
    if [ -n "${COMFYUI_PATH:-}" ]; then
        IFS=':' read -r -a entries <<< "$COMFYUI_PATH"
        for r in "${entries[@]}"; do
            [ -z "$r" ] && continue
            is_comfyui "$r" || die "COMFYUI_PATH entry '$r' is not a ComfyUI folder (no main.py, nodes.py and comfy/ in it). Point COMFYUI_PATH at the folder that contains ComfyUI's main.py."
            roots+=("$(cd "$r" && pwd)")
        done
    else
        local parent
        parent="$(cd "$PACK_DIR/.." && pwd)"
        if [ "$(basename "$parent")" = "custom_nodes" ] && is_comfyui "$(dirname "$parent")"; then
            roots+=("$(dirname "$parent")")
        fi
        for r in "$HOME/comfy/ComfyUI" "$HOME"/comfy/ComfyUI-*; do
            if is_comfyui "$r"; then
                r="$(cd "$r" && pwd)"
                case " ${roots[*]} " in *" $r "*) ;; *) roots+=("$r") ;; esac
            fi
        done
    fi
    for r in "${roots[@]}"; do echo "$r"; done
}

# Requirements of ComfyUI itself, minus torch* (installed from TORCH_SPEC) and the
# frontend/template packages when a second root pins other versions (first root wins).
comfy_requirements() {
    local seen="" r
    for r in "$@"; do
        while IFS= read -r line; do
            line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
            [ -z "$line" ] && continue
            name="$(echo "$line" | sed -E 's/[<>=~!;\[].*//' | tr 'A-Z_' 'a-z-')"
            case "$name" in torch|torchvision|torchaudio) continue ;; esac
            case " $seen " in *" $name "*) continue ;; esac
            seen="$seen $name"
            echo "$line"
        done < "$r/requirements.txt"
    done
    # ComfyUI 0.3.64's server imports requests without listing it.
    case " $seen " in *" requests "*) ;; *) echo "requests" ;; esac
}

setup_venv() {   # args: ComfyUI roots whose requirements to install
    local req_file stamp want
    mkdir -p "$(dirname "$VENV")"
    req_file="$(mktemp)"
    {
        echo "# torch: $TORCH_SPEC"
        comfy_requirements "$@"
        grep -v '^\s*#' "$PACK_DIR/requirements.txt"
        grep -v '^\s*#' "$PACK_DIR/requirements-test.txt"
    } > "$req_file"
    want="$(sha256sum "$req_file" | cut -c1-16)"
    stamp="$VENV/.xctrl-requirements"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        rm -f "$req_file"; install_overlays "$@"; return 0
    fi
    echo "Setting up the virtual environment in $VENV (first run takes several minutes) ..."
    [ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV" || die "could not create a venv with $PYTHON_BIN"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH_SPEC || die "installing $TORCH_SPEC failed"
    grep -v '^#' "$req_file" > "$req_file.txt"
    "$VENV/bin/python" -m pip install -q -r "$req_file.txt" $TORCH_SPEC || die "installing requirements failed (see pip's message above)"
    install_overlays "$@"
    echo "$want" > "$stamp"
    rm -f "$req_file" "$req_file.txt"
}

# ComfyUI pins its frontend/template packages per release and the two releases' pins do
# not work with each other's server: every root after the first gets an overlay with its own.
install_overlays() {
    local r
    for r in "${@:2}"; do
        local pins overlay
        pins="$(frontend_pins "$r")"
        overlay="$(overlay_path "$r")"
        if [ -n "$pins" ] && [ ! -d "$overlay" ]; then
            rm -rf "$overlay.partial"
            # shellcheck disable=SC2086
            "$VENV/bin/python" -m pip install -q --no-deps --target "$overlay.partial" $pins || die "installing $pins for $r failed"
            mv "$overlay.partial" "$overlay"
        fi
    done
}

# The comfyui-* packages a root pins (frontend, templates, docs).
frontend_pins() {
    sed -n 's/^\(comfyui-[a-z-]*==[^ #]*\).*/\1/p' "$1/requirements.txt" | tr '\n' ' '
}

# Where the frontend overlay of a root lives (PYTHONPATH for that root's ComfyUI).
overlay_path() {
    echo "$VENV/overlays/$(frontend_pins "$1" | sha256sum | cut -c1-12)"
}

# PYTHONPATH to run ComfyUI at root $1 when $2 is the first root (which uses the venv as is).
root_pythonpath() {
    if [ "$1" = "$2" ]; then echo "${PYTHONPATH:-}"; else echo "$(overlay_path "$1")${PYTHONPATH:+:$PYTHONPATH}"; fi
}

# The frontend tests drive Debian's Chromium (Playwright's own browser download is not used).
# Installed when missing and apt-get can run as root; otherwise those tests skip, loudly.
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "Installing Chromium for the frontend tests (apt-get) ..."
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
            || echo "WARNING: could not install chromium: the frontend tests will be skipped"
    else
        echo "WARNING: chromium is not installed (apt-get install chromium chromium-driver): the frontend tests will be skipped"
    fi
}
