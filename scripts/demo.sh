#!/usr/bin/env bash
# The main job: Mix-MoE multilingual translation on the machine's gettext catalogs.
#
#   bash scripts/demo.sh [--long] [mixmoe-translate train options...]
#
# 1. installs the missing Debian packages (as root) and builds examples/translate (build/demo);
# 2. downloads the catalogs of the packages named in data/corpus-packages.txt (never installing
#    them) into data/catalogs and builds the English->X corpus in data/corpus;
# 3. trains through all stages (tokenizer, stage 0 dense LM, stage 1 upcycled Mix-MoE on
#    monolingual text, stage 2 on translation prompts) in runs/, then prints the per-direction
#    BLEU/chrF table against the copy-the-source baseline and translates held-out sentences.
# A second run reuses the build, the catalogs, the corpus and every finished stage (add --fresh
# to train the Mix-MoE stages again). --long: the bigger, slower, better configuration (six
# languages, beam search; hours on 2 cores), in runs-long/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

# ---- the demo: the one place that names it ------------------------------------
DEMO_TARGET=mixmoe-translate                                   # CMake target of the example
DEMO_BINARY=build/demo/examples/translate/mixmoe-translate     # where the build puts it
DEMO_WORK=runs                                                 # tokenizer, checkpoints, results
DEMO_ARGS=(--preset demo)
# --------------------------------------------------------------------------------

args=()
for a in "$@"; do
  if [[ $a == --long ]]; then
    DEMO_ARGS=(--preset long)
    DEMO_WORK=runs-long
  else
    args+=("$a")
  fi
done

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" "${MIXMOE_DEPS_EXAMPLES[@]}"

start=$SECONDS
echo "==== demo: configure and build ${DEMO_TARGET}"
cmake --preset demo
cmake --build --preset demo --target "$DEMO_TARGET" --parallel "$(nproc)"
build_seconds=$((SECONDS - start))

echo
echo "==== demo: the corpus (data/corpus-packages.txt -> data/catalogs -> data/corpus)"
start=$SECONDS
bash scripts/fetch-catalogs.sh data/catalogs
if [[ ! -f data/corpus/manifest.json || data/catalogs/packages.tsv -nt data/corpus/manifest.json ]]; then
  "$DEMO_BINARY" corpus --catalogs data/catalogs --out data/corpus
else
  echo "corpus: data/corpus is up to date"
fi
data_seconds=$((SECONDS - start))

echo
echo "==== demo: ${DEMO_BINARY} train ${DEMO_ARGS[*]} --work ${DEMO_WORK}${args[*]:+ ${args[*]}}"
start=$SECONDS
"$DEMO_BINARY" train "${DEMO_ARGS[@]}" --work "$DEMO_WORK" "${args[@]}"
echo
echo "demo finished: build ${build_seconds}s, data ${data_seconds}s, training and tests $((SECONDS - start))s"
echo "translate your own text:  echo 'Save the file' | ${DEMO_BINARY} translate --model ${DEMO_WORK}/mix-fft/model --tgt de"
