#!/usr/bin/env bash
# The comparison of docs/results.md: the same data, tokenizer, stage-0 model and budget for
#   dense             full fine-tuning of the dense LM on the parallel data (the interference baseline)
#   moe               vanilla MoE: the same experts, one router over all of them, no Fourier features,
#                     nothing frozen in stage 2
#   mix-fft           Mix-MoE: LM + MT expert groups, FFT-magnitude router features, stages 1 and 2
#   mix-fft-nostage1  Mix-MoE without the monolingual stage 1
#   mix-dct           Mix-MoE with DCT router features
#   mix-random        Mix-MoE with random-projection router features
#   mix-fft-frozen-emb  mix-fft with the embeddings frozen in stage 2, as the paper's recipe
#                     (any variant name ending in -frozen-emb runs its base with --frozen-embeddings)
# then writes docs/results.md and its plots (scripts/results.py).
#
#   bash scripts/compare.sh [--preset demo|long] [--variants "dense moe ..."] [--work runs-compare] [--steps2 N]
# Every finished stage is reused, so an interrupted comparison continues where it stopped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

preset=demo
work=runs-compare
# The comparison's stage 2 is 2000 steps (the demo itself trains 3000): seven variants in about an hour.
steps2=2000
variants="dense moe mix-fft mix-fft-nostage1 mix-dct mix-random mix-fft-frozen-emb"
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --preset) preset=$2; shift 2 ;;
    --variants) variants=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --steps2) steps2=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" "${MIXMOE_DEPS_EXAMPLES[@]}" python3 python3-matplotlib
cmake --preset demo
cmake --build --preset demo --target mixmoe-translate --parallel "$(nproc)"
bin=build/demo/examples/translate/mixmoe-translate
bash scripts/fetch-catalogs.sh data/catalogs
if [[ ! -f data/corpus/manifest.json || data/catalogs/packages.tsv -nt data/corpus/manifest.json ]]; then
  "$bin" corpus --catalogs data/catalogs --out data/corpus
fi
for v in $variants; do
  echo
  echo "==== compare: $v"
  flags=()
  if [[ $v == *-frozen-emb ]]; then
    v=${v%-frozen-emb}
    flags=(--frozen-embeddings)
  fi
  "$bin" train --preset "$preset" --work "$work" --variant "$v" "${flags[@]}" --steps2 "$steps2" --show 0 "${extra[@]}"
done
/usr/bin/python3 scripts/results.py "$work" docs  # Debian's python3, with python3-matplotlib
