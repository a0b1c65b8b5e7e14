# The manual (included from the Makefile).
#   make docs   docs/CubeFit.html + docs/CubeFit.pdf (pandoc, XeLaTeX) and site/ (mkdocs build --strict);
#               installs pandoc/TeX Live (apt-get, as root) and mkdocs (pip, into the venv) when missing:
#               ~2.5 minutes the first time on a machine without TeX Live, ~10 s after that
.PHONY: docs docs-clean

PY ?= .venv/bin/python

docs:
	PY=$(PY) bash scripts/build_docs.sh

docs-clean:
	rm -rf site docs/CubeFit.html docs/CubeFit.pdf
