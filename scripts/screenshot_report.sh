#!/usr/bin/env bash
# Opens the page of `mdl report RUN... --html PAGE.html` in a real headless browser
# (Chromium), with the network cut off, checks what the browser rendered (every <svg> of
# the file is in the DOM it built, the page's <h1> and its metrics table are there, and the
# DOM refers to nothing outside the page: no script, stylesheet, image or frame source),
# and saves a screenshot of the whole page.
#
#   scripts/screenshot_report.sh PAGE.html OUT.png [WIDTH]      (default width 1000 px)
#
# Needs chromium (Debian: apt-get install chromium); exits 2 naming what is missing, 1
# when the rendered page is not the file's.
set -euo pipefail
page=${1:?usage: scripts/screenshot_report.sh PAGE.html OUT.png [WIDTH]}
out=${2:?usage: scripts/screenshot_report.sh PAGE.html OUT.png [WIDTH]}
width=${3:-1000}
[ -f "$page" ] || { echo "$page: no such file" >&2; exit 2; }
browser=""
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null; then browser=$(command -v "$b"); break; fi
done
[ -n "$browser" ] || { echo "no headless browser: install chromium (apt-get install chromium)" >&2; exit 2; }
url="file://$(realpath "$page")"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Chromium refuses its sandbox as root; the page runs no script, so none is needed. No
# host resolves: the page (and the browser's own services) reach no network.
flags=(--headless=new --no-sandbox --disable-gpu --hide-scrollbars --disable-background-networking
       --disable-component-update --disable-sync --no-first-run --user-data-dir="$scratch/profile"
       --host-resolver-rules="MAP * ~NOTFOUND")

# What the browser built from the file.
"$browser" "${flags[@]}" --dump-dom "$url" >"$scratch/dom.html" 2>"$scratch/dom.log"
want=$(grep -o '<svg' "$page" | wc -l)
got=$(grep -o '<svg' "$scratch/dom.html" | wc -l)
if [ "$want" -eq 0 ] || [ "$got" -ne "$want" ]; then
  echo "the browser's page has $got <svg> elements, the file $want" >&2
  exit 1
fi
grep -q '<h1>mdl report</h1>' "$scratch/dom.html" || { echo "no <h1> in the rendered page" >&2; exit 1; }
grep -q '<table>' "$scratch/dom.html" || { echo "no metrics table in the rendered page" >&2; exit 1; }
if grep -Eq '<script|<link|<img|<iframe| src=' "$scratch/dom.html"; then
  echo "the rendered page refers to something outside it:" >&2
  grep -Eo '<(script|link|img|iframe)[^>]*| src="[^"]*"' "$scratch/dom.html" | sort -u >&2
  exit 1
fi

# The whole page's height: each plot is at most 440 px high plus its margins, the table and text
# above them.
height=$((600 + want * 470))
"$browser" "${flags[@]}" --window-size="$width,$height" --screenshot="$out" "$url" 2>"$scratch/shot.log"
[ -s "$out" ] || { echo "no screenshot written: $(tail -3 "$scratch/shot.log")" >&2; exit 1; }
echo "$page: $got plots rendered by $("$browser" --version 2>/dev/null | head -1); screenshot $out (${width}x$height)"
