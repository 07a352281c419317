#!/usr/bin/env bash
# tests/render_check.sh [DIR ...] -- every picture bt wrote, rendered by headless Chromium.
# For each *.svg and trace*.html under the folders (default: results/):
#   1. Chromium's DOM of it (--dump-dom) must have no <parsererror>: that element is the pink box
#      Chromium shows instead of a file its XML parser rejects. An .html page is parsed as HTML,
#      which forgives anything, so it is also loaded as .xhtml (through the XML parser);
#   2. a screenshot (--screenshot, at the SVG's own size) must not be blank (a single colour) nor
#      show that pink box: tests/png_check.py decodes the PNG with Python's standard library.
# The PNGs are kept in $RENDER_OUT (default: a fresh temporary folder), to look at.
# Installs nothing (.ci/run installs Debian's chromium). make render-check runs it on results/
# and on the pictures the test suite writes (tests/pictures.cpp, BT_PICTURES_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "render check: no chromium on this machine (apt-get install chromium)"; exit 1; }
OUT=${RENDER_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# A fresh HOME for Chromium's profile. (Not --user-data-dir: with it, Chromium 156 clipped the
# screenshot of a 920x116 SVG to its top 28 rows.)
export HOME="$SCRATCH/home"
mkdir -p "$HOME"
FLAGS=(--headless --no-sandbox --disable-gpu --hide-scrollbars)

dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(results)
mapfile -t files < <(find "${dirs[@]}" \( -name '*.svg' -o -name 'trace*.html' \) -type f | sort)
[ ${#files[@]} -gt 0 ] || { echo "render check: no pictures under ${dirs[*]}"; exit 1; }

chrome() { timeout 120 "$CHROMIUM" "${FLAGS[@]}" "$@" 2>/dev/null; }
url() { echo "file://$(realpath "$1")"; }

failed=0
pngs=()
for f in "${files[@]}"; do
  if [[ $f == *.svg ]]; then   # the root's width and height
    size=$(grep -o -m1 '<svg[^>]*' "$f" | sed -n 's/.* width="\([0-9]*\)[0-9.]*" height="\([0-9]*\)[0-9.]*".*/\1,\2/p')
    size=${size:-800,600}
  else
    size=1400,2400
  fi
  bad=""
  chrome --dump-dom "$(url "$f")" | grep -q parsererror && bad="Chromium's XML parser rejects it"
  if [[ $f == *.html ]]; then
    cp "$f" "$SCRATCH/page.xhtml"
    chrome --dump-dom "$(url "$SCRATCH/page.xhtml")" | grep -q parsererror && bad="Chromium's XML parser rejects it as XHTML"
  fi
  png="$OUT/$(echo "$f" | tr '/' '_' | sed 's/^[._]*//').png"
  rm -f "$png"
  chrome --screenshot="$png" --window-size="$size" "$(url "$f")" >/dev/null || true
  [ -s "$png" ] || bad="${bad:+$bad; }no screenshot"
  if [ -n "$bad" ]; then echo "✗ $f: $bad"; failed=1; else echo "✓ $f ($size)"; fi
  [ -s "$png" ] && pngs+=("$png")
done
echo "== the screenshots (in $OUT)"
if [ ${#pngs[@]} -gt 0 ]; then /usr/bin/python3 tests/png_check.py "${pngs[@]}" || failed=1; fi
if [ $failed = 0 ]; then echo "render check: ${#files[@]} pictures render"; else echo "render check FAILED"; fi
exit $failed
