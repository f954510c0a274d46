#!/usr/bin/env bash
# Download the iso-codes package's JSON lists next to its catalogs, for the ISO-code task
# (mixmoe/data/iso_task.hpp), without installing anything.
#
#   scripts/fetch-iso-codes.sh [DIR]
#
# DIR (default data/catalogs/iso-codes, the directory scripts/fetch-catalogs.sh makes for the
# package) receives:
#   DIR/usr/share/iso-codes/json/*.json                 the ISO lists (iso_3166-1.json, iso_639-2.json, ...)
#   DIR/usr/share/locale/<lang>/LC_MESSAGES/iso_*.mo   the package's catalogs (as fetch-catalogs.sh lays them out)
#   DIR/.deb-info                                       "iso-codes\t<version>\t<sha256 of the .deb>"
# When DIR/.deb-info exists (fetch-catalogs.sh ran), the same version is downloaded and its sha256
# must match, so the lists and the catalogs come from one .deb; otherwise the current version is
# fetched and .deb-info written. Catalogs already in DIR are left as they are. Idempotent: with the
# JSON lists present nothing is downloaded. The C++ side reads the tree with
# IsoTaskOptions::under("data/catalogs/iso-codes").
set -euo pipefail

dir=${1:-data/catalogs/iso-codes}
pkg=iso-codes

die() { echo "fetch-iso-codes: $*" >&2; exit 1; }
for tool in apt-get dpkg-deb tar sha256sum; do
  command -v "$tool" >/dev/null || die "needs '$tool' (a Debian-based system)"
done

if [[ -f $dir/usr/share/iso-codes/json/iso_3166-1.json ]]; then
  echo "fetch-iso-codes: $dir already has the JSON lists" >&2
  exit 0
fi

want_version="" want_sha=""
if [[ -f $dir/.deb-info ]]; then
  IFS=$'\t' read -r name want_version want_sha <"$dir/.deb-info" || true
  [[ $name == "$pkg" && -n $want_version && -n $want_sha ]] || die "$dir/.deb-info is not an iso-codes record"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
spec=$pkg${want_version:+=$want_version}
echo "fetch-iso-codes: $spec" >&2
if ! (cd "$tmp" && apt-get download -q "$spec" >"$tmp/log" 2>&1); then
  cat "$tmp/log" >&2
  die "cannot download '$spec' ('sudo apt-get update' may help)"
fi
debs=("$tmp/${pkg}"_*.deb)
[[ -f ${debs[0]} ]] || die "apt-get download $spec left no ${pkg}_*.deb"
deb=${debs[0]}
version=$(dpkg-deb -f "$deb" Version)
sha=$(sha256sum "$deb" | cut -d' ' -f1)
if [[ -n $want_sha && $sha != "$want_sha" ]]; then
  die "$pkg $version downloaded now has sha256 $sha, but $dir/.deb-info records $want_sha"
fi

mkdir -p "$tmp/x"
dpkg-deb --fsys-tarfile "$deb" |
  tar -x -C "$tmp/x" --no-same-owner --wildcards './usr/share/iso-codes/json/*.json' \
    './usr/share/locale/*/LC_MESSAGES/iso_*.mo' 2>"$tmp/log" ||
  { cat "$tmp/log" >&2; die "$pkg $version has no usr/share/iso-codes/json/*.json"; }

mkdir -p "$dir/usr/share/iso-codes"
rm -rf "$dir/usr/share/iso-codes/json"
mv "$tmp/x/usr/share/iso-codes/json" "$dir/usr/share/iso-codes/json"
if [[ ! -f $dir/.deb-info ]]; then
  mkdir -p "$dir/usr/share"
  rm -rf "$dir/usr/share/locale"
  mv "$tmp/x/usr/share/locale" "$dir/usr/share/locale"
  printf '%s\t%s\t%s\n' "$pkg" "$version" "$sha" >"$dir/.deb-info"
fi
echo "fetch-iso-codes: $pkg $version in $dir ($(find "$dir/usr/share/iso-codes/json" -name "*.json" | wc -l) JSON files)" >&2
