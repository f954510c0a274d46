#!/usr/bin/env bash
# Fuzzes mixmoe's file readers with libFuzzer (clang-14, AddressSanitizer + UBSan): builds the
# targets of fuzz/ in build/fuzz, writes a seed corpus per target (msgfmt-compiled .mo
# catalogs, small safetensors files from fuzz/make_seeds, sample TSV and text), then runs each
# target for a bounded time and prints a summary.
#
# Usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
#   e.g. bash scripts/fuzz.sh 300 fuzz_mo      (names as in fuzz/fuzz_*.cpp; default: all)
# Exit status: non-zero when a target crashed, leaked, timed out or ran out of memory; the
# input that did it is kept under build/fuzz/crashes/ (reproduce: build/fuzz/TARGET FILE).
# The corpus grown by each run is kept in build/fuzz/corpus/TARGET and reused next time.
# Installs clang-14, libclang-rt-14-dev and gettext when missing (as root). Not part of CTest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || [[ $seconds -eq 0 ]]; then
  echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]   (seconds: a positive integer, got '$seconds')" >&2
  exit 2
fi

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" clang-14 libclang-rt-14-dev gettext

out=build/fuzz
jobs=${FUZZ_BUILD_JOBS:-$(nproc)}
echo "==== build ($jobs jobs)"
cmake -S fuzz -B "$out" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$out" --parallel "$jobs"

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  for src in fuzz/fuzz_*.cpp; do targets+=("$(basename "$src" .cpp)"); done
fi

# ---- seed corpora ------------------------------------------------------------
seeds=$out/seeds
rm -rf "$seeds"
mkdir -p "$seeds" "$out/crashes"

# fuzz_mo: catalogs compiled by msgfmt (little and big endian, UTF-8 and Latin-1, plurals, contexts).
mkdir -p "$seeds/fuzz_mo" "$out/po"
cat >"$out/po/utf8.po" <<'PO'
msgid ""
msgstr ""
"Language: de\n"
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=2; plural=(n != 1);\n"

msgid "Open file"
msgstr "Datei öffnen"

msgctxt "menu"
msgid "Quit"
msgstr "Beenden"

msgid "%d file"
msgid_plural "%d files"
msgstr[0] "%d Datei"
msgstr[1] "%d Dateien"
PO
cat >"$out/po/latin1.po" <<'PO'
msgid ""
msgstr ""
"Language: fr\n"
"Content-Type: text/plain; charset=ISO-8859-1\n"

msgid "Error"
msgstr "Erreur répétée"
PO
iconv -f UTF-8 -t ISO-8859-1 "$out/po/latin1.po" >"$out/po/latin1.iso.po"
msgfmt -o "$seeds/fuzz_mo/utf8.mo" "$out/po/utf8.po"
msgfmt --endianness=big -o "$seeds/fuzz_mo/utf8_big.mo" "$out/po/utf8.po"
msgfmt -o "$seeds/fuzz_mo/latin1.mo" "$out/po/latin1.iso.po"

# fuzz_text: the first byte selects reader options, the rest is the text.
mkdir -p "$seeds/fuzz_text"
printf '\x03Hello\tHallo\nGood morning\tGuten Morgen\textra\n' >"$seeds/fuzz_text/parallel"
printf '\xffsource\ttarget\r\n\n# comment\n\tonly target\n' >"$seeds/fuzz_text/crlf_comment"
printf '\x01\xef\xbb\xbfZa\xc5\xbc\xc3\xb3\xc5\x82\xc4\x87\tg\xc4\x99\xc5\x9bl\xc4\x85\n\xe6\x97\xa5\xe6\x9c\xac\n' \
  >"$seeds/fuzz_text/bom_utf8"
printf '\x18a\tb\tc\nd\te\tf\n' >"$seeds/fuzz_text/three_columns"

# fuzz_safetensors, fuzz_json_config, fuzz_trainer_state: written by the library (fuzz/make_seeds.cpp).
"$out/make_seeds" "$seeds" >/dev/null
printf '{}' >"$seeds/fuzz_json_config/empty_object"
printf '{"format":"mixmoe","config":{"vocab":100,"d_model":8,"heads":2,"moe":{}}}' >"$seeds/fuzz_json_config/short"

# ---- runs ----------------------------------------------------------------------
declare -A result runs corpus_size
failed=0
for t in "${targets[@]}"; do
  if [[ ! -x $out/$t ]]; then
    echo "no fuzz target '$t' (built: $(cd "$out" && ls fuzz_* 2>/dev/null | tr '\n' ' '))" >&2
    exit 2
  fi
  corpus=$out/corpus/$t
  mkdir -p "$corpus" "$seeds/$t"
  log=$out/$t.log
  rm -f "$out/crashes/$t"-*  # what is left there afterwards is this run's
  echo "==== $t: ${seconds}s"
  set +e
  dict=()
  [[ $t == fuzz_json_config || $t == fuzz_trainer_state || $t == fuzz_manifest ]] && dict=(-dict=fuzz/json.dict)
  "$out/$t" "$corpus" "$seeds/$t" "${dict[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$out/crashes/$t-" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs[$t]=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus_size[$t]=$(find "$corpus" -type f | wc -l)
  if [[ $rc -eq 0 ]]; then
    result[$t]=ok
  else
    failed=$((failed + 1))
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    result[$t]="FAILED (exit $rc): ${artifact:-see $log}"
    grep -m1 -E 'ERROR: |runtime error|deadly signal|Timeout|out-of-memory' "$log" || true
  fi
done

echo
echo "==== fuzz summary (${seconds}s per target; logs in $out/TARGET.log)"
printf '%-22s %12s %8s  %s\n' target executions corpus result
for t in "${targets[@]}"; do
  printf '%-22s %12s %8s  %s\n' "$t" "${runs[$t]:-?}" "${corpus_size[$t]}" "${result[$t]}"
done
if [[ $failed -gt 0 ]]; then
  echo "$failed target(s) failed; inputs kept under $out/crashes/"
  exit 1
fi
