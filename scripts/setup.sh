#!/usr/bin/env bash
# Create/update the project's virtual environment (.venv) and install ernie-edge into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --gui    + the desktop app: its Python packages (PyQt6, ...) and, on Debian/Ubuntu,
#                             the system libraries Qt needs, a CJK font and Xvfb (apt-get, as root or
#                             with sudo; otherwise it prints the exact command to run)
#   scripts/setup.sh --test   + everything the test suite needs (torch CPU, transformers, pytest,
#                             pytest-qt, the desktop app's packages and system libraries)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODE=${1:-}

# Qt 6's xcb platform plugin and what it loads, a font with Chinese glyphs, Xvfb for screenshots.
GUI_SYSTEM_PACKAGES=(libegl1 libgl1 libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0
    libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
    libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 fonts-wqy-microhei xvfb xauth)

install_gui_system_packages() {
    if ! command -v dpkg >/dev/null 2>&1; then
        echo "setup.sh: not a Debian/Ubuntu system: install Qt 6's xcb libraries, a CJK font (e.g." \
             "WenQuanYi Micro Hei or Noto Sans CJK) and Xvfb with your package manager" >&2
        return 0
    fi
    local missing=() pkg
    for pkg in "${GUI_SYSTEM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo"
        else
            echo "setup.sh: the desktop app needs these system packages; run:" >&2
            echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
            return 0
        fi
    fi
    echo "setup.sh: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.ernie-edge-installed${MODE}"
# Reinstall only when pyproject.toml changed since the last successful install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    case "$MODE" in
        # torch is pinned exactly: an unpinned torch can pull a multi-GB CUDA build.
        --test) .venv/bin/python -m pip install --quiet -e ".[test]" ;;
        --gui) .venv/bin/python -m pip install --quiet -e ".[gui]" ;;
        *) .venv/bin/python -m pip install --quiet -e . ;;
    esac
    touch "$stamp"
fi
if [ "$MODE" = "--gui" ] || [ "$MODE" = "--test" ]; then
    install_gui_system_packages
fi
