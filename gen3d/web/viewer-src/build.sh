#!/usr/bin/env bash
# Rebuilds gen3d/web/viewer.js from main.js: three.js (MIT) and its GLTFLoader and OrbitControls
# from the npm registry, bundled and minified by esbuild into one classic script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
cd "$work"
npm init -y >/dev/null
npm install --silent three@0.187.0 esbuild@0.28.2
cp "$here/main.js" .
npx esbuild main.js --bundle --minify --format=iife --legal-comments=inline --target=es2020 \
  --banner:js="/* gen3d viewer: three.js r187 with GLTFLoader and OrbitControls (MIT, see LICENSE.three.txt), bundled by esbuild from viewer-src/main.js */" \
  --outfile="$here/../viewer.js"
cp node_modules/three/LICENSE "$here/../LICENSE.three.txt"
rm -rf "$work"
