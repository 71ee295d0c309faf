# Shared by run_comfyui.sh and run_tests.sh: find (or fetch) ComfyUI, build the environment.
# Sourced, not executed. Everything it installs goes outside the repo: one virtual environment
# (default ~/.cache/xctrl-nodes/venv, override with XCTRL_VENV) that only ever grows, plus one
# small overlay per ComfyUI frontend pin set, so that alternating ComfyUI versions never
# reinstalls anything.

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XCTRL_VENV:-$HOME/.cache/xctrl-nodes/venv}"
PYTHON_BIN="${PYTHON:-python3}"
# One torch set that every tested ComfyUI imports: from about 0.2x on ComfyUI imports torchaudio
# at start, and the newest torchaudio on PyPI (2.11) pins torch 2.11 / torchvision 0.26.
# Set TORCH_SPEC to use another set.
TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0}"
# The ComfyUI releases this pack is tested with; fetched into comfy-cli's default place when no
# ComfyUI is found (XCTRL_COMFYUI_REPO and XCTRL_COMFY_HOME exist for the offline tests).
COMFYUI_REPO="${XCTRL_COMFYUI_REPO:-https://github.com/comfyanonymous/ComfyUI}"
COMFYUI_RELEASE="v0.33.0"
COMFYUI_OLDER_RELEASES="v0.8.0 v0.3.64"
COMFY_HOME="${XCTRL_COMFY_HOME:-$HOME/comfy}"

die() { echo "ERROR: $*" >&2; exit 2; }

is_comfyui() { [ -f "$1/main.py" ] && [ -f "$1/nodes.py" ] && [ -d "$1/comfy" ]; }

# Prints one ComfyUI root per line, in order of preference.
#   COMFYUI_PATH=root[:root...]    explicit; every entry must be a ComfyUI root
#   otherwise: the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>),
#   then comfy-cli's default workspace ~/comfy/ComfyUI and its siblings ~/comfy/ComfyUI-*
#   (e.g. ~/comfy/ComfyUI-0.3.64 for the second version).
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
        for r in "$COMFY_HOME/ComfyUI" "$COMFY_HOME"/ComfyUI-*; do
            if is_comfyui "$r"; then
                r="$(cd "$r" && pwd)"
                case " ${roots[*]} " in *" $r "*) ;; *) roots+=("$r") ;; esac
            fi
        done
    fi
    for r in "${roots[@]}"; do echo "$r"; done
}

# Clones ComfyUI release $1 into $2 (via $2.partial, so an interrupted clone never looks like a
# ComfyUI). Returns non-zero when the network (or the repository) is not reachable.
fetch_comfyui() {
    local tag="$1" dest="$2"
    is_comfyui "$dest" && return 0
    command -v git >/dev/null 2>&1 || return 1
    rm -rf "$dest.partial"
    mkdir -p "$(dirname "$dest")"
    echo "Fetching ComfyUI $tag into $dest ..." >&2
    if GIT_TERMINAL_PROMPT=0 git clone -q --depth 1 --branch "$tag" "$COMFYUI_REPO" "$dest.partial" 2>/dev/null \
            && is_comfyui "$dest.partial"; then
        mv "$dest.partial" "$dest"
        return 0
    fi
    rm -rf "$dest.partial"
    return 1
}

# The roots to use, fetching the tested releases when none is found and the network allows:
# $1 = "primary" (run_comfyui.sh) or "both" (run_tests.sh: the older tested versions too).
# Prints nothing when none is found and fetching failed; the caller says what to do.
comfyui_roots() {
    local found
    found="$(find_comfyui_roots)" || exit 2
    if [ -z "$found" ] && [ -z "${COMFYUI_PATH:-}" ]; then
        if fetch_comfyui "$COMFYUI_RELEASE" "$COMFY_HOME/ComfyUI"; then
            if [ "$1" = both ]; then
                local tag
                for tag in $COMFYUI_OLDER_RELEASES; do
                    fetch_comfyui "$tag" "$COMFY_HOME/ComfyUI-${tag#v}" \
                        || echo "WARNING: could not fetch ComfyUI $tag: its tests are skipped" >&2
                done
            fi
            found="$(find_comfyui_roots)" || exit 2
        fi
    fi
    [ -n "$found" ] && echo "$found"
    return 0
}

# Other packs the tests run the pack with (tiled upscaling, distributed workers): a checkout in
# ~/comfy-extras/<name> (or the folder its XCTRL_* variable names), cloned there when missing and
# the network allows; without one, their tests skip with one loud line. Prints the folder.
EXTRAS_HOME="${XCTRL_EXTRAS_HOME:-$HOME/comfy-extras}"
optional_pack() {   # args: folder name, repository URL
    local dest="$EXTRAS_HOME/$1"
    if [ ! -d "$dest" ] && command -v git >/dev/null 2>&1; then
        mkdir -p "$EXTRAS_HOME"
        GIT_TERMINAL_PROMPT=0 git clone -q --depth 1 "$2" "$dest.partial" 2>/dev/null && mv "$dest.partial" "$dest"
        rm -rf "$dest.partial"
    fi
    echo "$dest"
}

NO_COMFYUI="no ComfyUI found, and it could not be fetched from $COMFYUI_REPO (offline?). Set COMFYUI_PATH=/path/to/ComfyUI (several separated by ':'), put this pack in ComfyUI/custom_nodes/, or clone ComfyUI $COMFYUI_RELEASE to $COMFY_HOME/ComfyUI."

# One requirement per line for the given roots: ComfyUI's (minus torch*, installed from
# TORCH_SPEC, and minus its comfyui-* frontend packages, which go to the per-root overlays),
# then the pack's and the tests'.
requirement_lines() {
    local r line name seen=""
    for r in "$@"; do
        while IFS= read -r line; do
            line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
            [ -z "$line" ] && continue
            name="$(echo "$line" | sed -E 's/[<>=~!;\[].*//' | tr 'A-Z_' 'a-z-')"
            case "$name" in torch|torchvision|torchaudio|comfyui-*) continue ;; esac
            case " $seen " in *" $line "*) continue ;; esac
            seen="$seen $line"
            echo "$line"
        done < "$r/requirements.txt"
    done
    echo "requests"  # ComfyUI 0.3.64's server imports it without listing it
    grep -v '^\s*#' "$PACK_DIR/requirements.txt" | grep -v '^\s*$'
    grep -v '^\s*#' "$PACK_DIR/requirements-test.txt" | grep -v '^\s*$'
}

# The venv: created once, then only the requirement lines it has not installed yet are
# installed (the stamp lists what it has), so a second ComfyUI version adds, never rebuilds.
setup_venv() {   # args: ComfyUI roots whose requirements to install
    local stamp="$VENV/.xctrl-installed" wanted missing
    mkdir -p "$(dirname "$VENV")"
    if [ ! -x "$VENV/bin/python" ] || ! grep -qxF "torch: $TORCH_SPEC" "$stamp" 2>/dev/null; then
        echo "Setting up the virtual environment in $VENV (first run takes several minutes) ..."
        [ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV" || die "could not create a venv with $PYTHON_BIN (Debian/Ubuntu: apt-get install python3-venv)"
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q $TORCH_SPEC || die "installing $TORCH_SPEC failed"
        echo "torch: $TORCH_SPEC" > "$stamp"
    fi
    wanted="$(requirement_lines "$@")"
    missing="$(grep -vxF -f "$stamp" <<< "$wanted" || true)"
    if [ -n "$missing" ]; then
        echo "Installing into $VENV: $(echo $missing)"
        local req_file
        req_file="$(mktemp)"
        echo "$missing" > "$req_file"
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q -r "$req_file" $TORCH_SPEC || { rm -f "$req_file"; die "installing requirements failed (see pip's message above)"; }
        rm -f "$req_file"
        echo "$missing" >> "$stamp"
    fi
    install_overlays "$@"
}

# Each ComfyUI release pins its frontend/template packages and the releases' pins do not work
# with each other's server: every root gets an overlay folder with its own (PYTHONPATH).
install_overlays() {
    local r pins overlay
    for r in "$@"; do
        pins="$(frontend_pins "$r")"
        overlay="$(overlay_path "$r")"
        if [ -n "$pins" ] && [ ! -d "$overlay" ]; then
            rm -rf "$overlay.partial"
            # shellcheck disable=SC2086
            "$VENV/bin/python" -m pip install -q --target "$overlay.partial" $pins || die "installing $pins for $r failed"
            mv "$overlay.partial" "$overlay"
        fi
    done
}

# The comfyui-* packages a root pins (frontend, templates, docs).
frontend_pins() {
    sed -n 's/^\(comfyui-[a-z-]*==[^ #]*\).*/\1/p' "$1/requirements.txt" | tr '\n' ' '
}

# Where the frontend overlay of a root lives.
overlay_path() {
    echo "$VENV/overlays/$(frontend_pins "$1" | sha256sum | cut -c1-12)"
}

# PYTHONPATH to run ComfyUI at root $1: its overlay first.
root_pythonpath() {
    if [ -n "$(frontend_pins "$1")" ]; then echo "$(overlay_path "$1")${PYTHONPATH:+:$PYTHONPATH}"; else echo "${PYTHONPATH:-}"; fi
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
