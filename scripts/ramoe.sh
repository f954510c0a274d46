#!/usr/bin/env bash
# The RA-MoE comparison on the ISO-code task (examples/ramoe, docs/ramoe.md):
#
#   bash scripts/ramoe.sh [mixmoe-ramoe compare options...]     e.g. --seeds 1,2,3,4,5
#
# 1. installs the missing Debian packages (as root) and builds mixmoe-translate and mixmoe-ramoe
#    (build/demo);
# 2. the catalogs and the corpus as scripts/demo.sh makes them, and the iso-codes lists
#    (scripts/fetch-iso-codes.sh);
# 3. a Mix-MoE translation model for de, fr, es, ru, ja and zh_CN in runs-ramoe/ (the demo preset's
#    recipe with shorter stages, 400 / 150 / 400 steps, at a wider size: 8000 pieces, d 192, FFN 768;
#    reused when it is there);
# 4. mixmoe-ramoe compare: base, SFT, Routing Steering (soft, hard), RISE and RA-MoE over three
#    seeds, into runs-ramoe/ramoe/results.json;
# 5. scripts/ramoe_results.py: the RA-MoE section of docs/results.md and its plots.
# About half an hour on 2 cores (the model, then the comparison), plus the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" "${MIXMOE_DEPS_EXAMPLES[@]}" python3 python3-matplotlib
cmake --preset demo
cmake --build --preset demo --target mixmoe-translate mixmoe-ramoe --parallel "$(nproc)"
translate=build/demo/examples/translate/mixmoe-translate
ramoe=build/demo/examples/ramoe/mixmoe-ramoe

bash scripts/fetch-catalogs.sh data/catalogs
if [[ ! -f data/corpus/manifest.json || data/catalogs/packages.tsv -nt data/corpus/manifest.json ]]; then
  "$translate" corpus --catalogs data/catalogs --out data/corpus
fi
bash scripts/fetch-iso-codes.sh data/catalogs/iso-codes

"$translate" train --variant mix-fft --preset demo --work runs-ramoe --langs de,fr,es,ru,ja,zh_CN \
  --vocab 8000 --d-model 192 --d-ff 768 --steps0 400 --steps1 150 --steps2 400 --test-sentences 50 --show 0
"$ramoe" compare --model runs-ramoe/mix-fft/model --iso data/catalogs/iso-codes --corpus data/corpus \
  --out runs-ramoe/ramoe "$@"
/usr/bin/python3 scripts/ramoe_results.py runs-ramoe/ramoe/results.json docs
