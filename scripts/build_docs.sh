#!/bin/bash
# Build the manual (make docs): docs/CubeFit.html and docs/CubeFit.pdf with pandoc (the spec's
# "Building the docs" commands; the PDF through XeLaTeX), then the site with
# `mkdocs build --strict` into site/.  Installs what is missing: Debian's pandoc, texlive-xetex,
# texlive-fonts-recommended (XeTeX's hyperref needs its pzdr font), lmodern and fonts-dejavu-core
# via apt-get (as root), mkdocs and mkdocs-material into the venv via pip.
#
# Fonts: the spec names Latin Modern, which has no Greek and few math symbols (λ, χ, ≤, ≥, ∈, ∫,
# ᵀ, ↔ come out as blanks), so the PDF uses DejaVu Serif / DejaVu Sans Mono by default; set
# PDF_MAINFONT / PDF_MONOFONT to override.  Any "Missing character" warning fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MAINFONT=${PDF_MAINFONT:-DejaVu Serif}
MONOFONT=${PDF_MONOFONT:-DejaVu Sans Mono}
SRC=docs/CubeFit.md

need=()
command -v pandoc >/dev/null 2>&1 || need+=(pandoc)
command -v xelatex >/dev/null 2>&1 || need+=(texlive-xetex)
command -v kpsewhich >/dev/null 2>&1 && kpsewhich pzdr.tfm >/dev/null 2>&1 || need+=(texlive-fonts-recommended)
command -v kpsewhich >/dev/null 2>&1 && kpsewhich lmodern.sty >/dev/null 2>&1 || need+=(lmodern)
[ -n "$(fc-list "DejaVu Serif" 2>/dev/null)" ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build_docs: missing ${need[*]}: run 'sudo apt-get install --no-install-recommends ${need[*]}'" >&2
        exit 1
    fi
    echo "build_docs: installing ${need[*]} (apt-get, ~2-3 minutes the first time)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
"$PY" -c "import mkdocs, material" 2>/dev/null || "$PY" -m pip install -q "mkdocs>=1.5" "mkdocs-material>=9"

t0=$SECONDS
pandoc -s -f gfm -t html5 "$SRC" -o docs/CubeFit.html --metadata title="CubeFit" --toc
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! (cd docs && pandoc -s -f gfm CubeFit.md -o CubeFit.pdf --pdf-engine=xelatex -V geometry:margin=1in \
        -V mainfont="$MAINFONT" -V monofont="$MONOFONT" --toc) 2>"$log"; then
    cat "$log" >&2
    echo "build_docs: the PDF failed" >&2
    exit 1
fi
if grep -q "Missing character" "$log"; then
    grep "Missing character" "$log" | sort | uniq -c >&2
    echo "build_docs: the PDF lacks glyphs (fonts $MAINFONT / $MONOFONT); choose fonts that cover them" >&2
    exit 1
fi
# (not --quiet: with it, mkdocs 1.6 does not count warnings and --strict passes anyway)
if ! NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict >"$log" 2>&1; then
    grep -v "^INFO" "$log" >&2
    echo "build_docs: mkdocs build --strict failed" >&2
    exit 1
fi
echo "build_docs: docs/CubeFit.html, docs/CubeFit.pdf and site/ built in $((SECONDS - t0)) s"
