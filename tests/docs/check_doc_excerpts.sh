#!/usr/bin/env bash
# Checks that the C++ fragments of documentation pages are excerpts of the page's complete programs.
#
# scripts/check-docs.sh compiles and runs every ```cpp block that defines main() (a program); the shorter
# blocks (fragments) are not compiled on their own. For the pages given here, every non-blank line of every
# fragment must also be a line of one of the same page's programs (compared without leading and trailing
# blanks, runs of blanks counted as one), so that no line of C++ on the page escapes the compiler.
# Usage: check_doc_excerpts.sh PAGE.md...   Exit status: 0 when every fragment line is found.
set -euo pipefail
if [[ $# -eq 0 ]]; then
  echo "usage: $0 PAGE.md..." >&2
  exit 2
fi
status=0
for md in "$@"; do
  if [[ ! -f $md ]]; then
    echo "$md: no such page" >&2
    status=1
    continue
  fi
  awk -v page="$md" '
    function norm(s) { gsub(/[ \t]+/, " ", s); sub(/^ /, "", s); sub(/ $/, "", s); return s }
    /^```cpp[ \t]*$/ { inside = 1; n = 0; next }
    inside && /^```[ \t]*$/ {
      inside = 0
      program = 0
      for (i = 1; i <= n; ++i) if (text[i] ~ /int main\(/) program = 1
      if (program) {
        ++programs
        for (i = 1; i <= n; ++i) known[norm(text[i])] = 1
      } else {
        for (i = 1; i <= n; ++i)
          if (norm(text[i]) != "") { ++pending; want[pending] = norm(text[i]); at[pending] = where[i] }
      }
      next
    }
    inside { ++n; text[n] = $0; where[n] = NR }
    END {
      bad = 0
      if (pending > 0 && programs == 0) {
        printf "%s: C++ fragments but no complete program to take them from\n", page
        exit 1
      }
      for (i = 1; i <= pending; ++i)
        if (!(want[i] in known)) {
          printf "%s:%d: not a line of any program of the page: %s\n", page, at[i], want[i]
          bad = 1
        }
      printf "%s: %d fragment lines, %s its %d program(s)\n", page, pending, bad ? "NOT all from" : "all from", programs
      exit bad
    }' "$md" || status=1
done
exit "$status"
