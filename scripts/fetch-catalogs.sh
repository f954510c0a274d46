#!/usr/bin/env bash
# Download the gettext catalogs of the translation corpus, without installing anything.
#
#   scripts/fetch-catalogs.sh [DIR] [PACKAGE-LIST]
#
# DIR (default data/catalogs) receives, for every package named in PACKAGE-LIST (default
# data/corpus-packages.txt):
#   DIR/<package>/usr/share/locale/<lang>/LC_MESSAGES/*.mo   the package's catalogs, nothing else
#   DIR/<package>/.deb-info                                   "<package>\t<version>\t<sha256 of the .deb>"
# and DIR/packages.tsv, one such line per package in list order, which the C++ corpus builder
# (mixmoe/data/corpus.hpp) reads. The .deb files come from `apt-get download` (root not needed);
# they are unpacked with `dpkg-deb --fsys-tarfile | tar`, so no maintainer script ever runs.
# Idempotent: a package whose .deb-info exists is not fetched again, and a second run with the
# same list changes no file. To refresh a package, delete its directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-data/catalogs}
list=${2:-$here/../data/corpus-packages.txt}

die() { echo "fetch-catalogs: $*" >&2; exit 1; }
for tool in apt-get dpkg-deb tar sha256sum; do
  command -v "$tool" >/dev/null || die "needs '$tool' (a Debian-based system)"
done
[[ -r $list ]] || die "cannot read the package list '$list'"

mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
((${#packages[@]} > 0)) || die "'$list' names no package"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
updated=0

# apt-get download into $tmp/deb; on failure refresh the package lists once (root only) and retry.
download() {
  local pkg=$1
  rm -rf "$tmp/deb" && mkdir -p "$tmp/deb"
  # As root, apt warns that its sandbox user cannot write to the directory; that is harmless.
  if (cd "$tmp/deb" && apt-get download -q "$pkg" >"$tmp/log" 2>&1); then return 0; fi
  if ((updated == 0)); then
    updated=1
    if [[ $(id -u) == 0 ]]; then
      echo "fetch-catalogs: 'apt-get download $pkg' failed; running 'apt-get update' once" >&2
      apt-get update -q >&2 || true
    else
      echo "fetch-catalogs: 'apt-get download $pkg' failed; 'sudo apt-get update' may help" >&2
    fi
    if (cd "$tmp/deb" && apt-get download -q "$pkg" >"$tmp/log" 2>&1); then return 0; fi
  fi
  cat "$tmp/log" >&2
  die "cannot download package '$pkg'"
}

fetched=0
for pkg in "${packages[@]}"; do
  [[ $pkg =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || die "'$pkg' in '$list' is not a Debian package name"
  [[ -f $dir/$pkg/.deb-info ]] && continue
  echo "fetch-catalogs: $pkg" >&2
  download "$pkg"
  debs=("$tmp/deb/${pkg}"_*.deb)
  [[ -f ${debs[0]} ]] || die "apt-get download $pkg left no ${pkg}_*.deb"
  deb=${debs[0]}
  version=$(dpkg-deb -f "$deb" Version)
  sha=$(sha256sum "$deb" | cut -d' ' -f1)
  rm -rf "$tmp/x" && mkdir -p "$tmp/x"
  # Only the catalogs; symbolic links among them are kept as links (the reader skips them).
  dpkg-deb --fsys-tarfile "$deb" |
    tar -x -C "$tmp/x" --no-same-owner --wildcards './usr/share/locale/*/LC_MESSAGES/*.mo' 2>"$tmp/log" ||
    { cat "$tmp/log" >&2; die "package '$pkg' $version has no usr/share/locale/*/LC_MESSAGES/*.mo"; }
  printf '%s\t%s\t%s\n' "$pkg" "$version" "$sha" >"$tmp/x/.deb-info"
  rm -rf "${dir:?}/$pkg"
  mv "$tmp/x" "$dir/$pkg"
  fetched=$((fetched + 1))
done

# packages.tsv in list order; rewritten only when its content changes.
{
  echo "# package	version	sha256 (of the .deb), written by scripts/fetch-catalogs.sh"
  for pkg in "${packages[@]}"; do cat "$dir/$pkg/.deb-info"; done
} >"$tmp/packages.tsv"
if ! cmp -s "$tmp/packages.tsv" "$dir/packages.tsv"; then
  cp "$tmp/packages.tsv" "$dir/packages.tsv"
fi
echo "fetch-catalogs: ${#packages[@]} packages in $dir ($fetched downloaded now)" >&2
