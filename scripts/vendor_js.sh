#!/usr/bin/env bash
# Vendors the browser libraries the mesh's pages use (web/package.json, pinned by
# web/package-lock.json) from the npm registry into web/vendor/, which the entry and the node
# console serve and the Python package ships. No page loads anything from the internet.
# Idempotent: a second run with the same lock file does nothing.
set -euo pipefail
cd "$(dirname "$0")/../web"
OUT=vendor
stamp="$OUT/.lock-sha256"
want=$(sha256sum package-lock.json | cut -d' ' -f1)
files=(chart.umd.min.js chart.js.LICENSE.md kurkle-color.LICENSE.md marked.umd.js marked.LICENSE purify.min.js dompurify.LICENSE)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && (cd "$OUT" && ls "${files[@]}" >/dev/null 2>&1); then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "vendor_js.sh: npm is missing (apt-get install nodejs npm)" >&2
    exit 1
fi
echo "==> vendoring chart.js, marked, DOMPurify from the npm registry (web/package-lock.json)"
# --ignore-scripts: nothing from the registry runs here; only the published files are copied.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
mkdir -p "$OUT"
copy() {  # src dst: the file without its source-map comment (the maps are not shipped)
    sed '/^\/\/# sourceMappingURL=/d' "$1" > "$OUT/$2.tmp" && mv "$OUT/$2.tmp" "$OUT/$2"
}
copy node_modules/chart.js/dist/chart.umd.min.js chart.umd.min.js
cp node_modules/chart.js/LICENSE.md "$OUT/chart.js.LICENSE.md"
# chart.js bundles @kurkle/color into its UMD file: its licence goes along.
cp node_modules/@kurkle/color/LICENSE.md "$OUT/kurkle-color.LICENSE.md"
copy node_modules/marked/lib/marked.umd.js marked.umd.js
cp node_modules/marked/LICENSE "$OUT/marked.LICENSE"
copy node_modules/dompurify/dist/purify.min.js purify.min.js
cp node_modules/dompurify/LICENSE "$OUT/dompurify.LICENSE"
echo "$want" > "$stamp"
