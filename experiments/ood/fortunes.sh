#!/usr/bin/env bash
# An out-of-domain English text for `ultramem eval RUN --data`: the fortune-mod quotations
# (Debian package `fortunes` 1:1.99.1-7.3, BSD licence; 2.4 MB in 39 files: jokes, quotes,
# definitions, computing, politics, songs...). pd-english is books, speeches and the 1960s Brown
# corpus; this is short, informal and modern. Writes one .txt a category under OUT (default
# experiments/cache/ood/fortunes), with the "%" separators and overstrike sequences removed.
#
#   bash experiments/ood/fortunes.sh [OUT]
set -euo pipefail
OUT=${1:-experiments/cache/ood/fortunes}
VERSION=1:1.99.1-7.3
SHA256=41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "fortunes=$VERSION" >/dev/null 2>&1)
deb=$(ls "$work"/fortunes_*.deb)
echo "$SHA256  $deb" | sha256sum --check --quiet
dpkg-deb -x "$deb" "$work/x"
mkdir -p "$OUT"
src="$work/x/usr/share/games/fortunes"
for f in "$src"/*; do
  name=$(basename "$f")
  # the .dat indexes, the UTF-8 duplicates (symlinks) and the ASCII drawings are not text
  [[ -L "$f" || "$name" == *.dat || "$name" == ascii-art ]] && continue
  sed -e 's/.\x08//g' -e '/^%$/d' "$f" > "$OUT/$name.txt"
done
echo "wrote $(ls "$OUT" | wc -l) files, $(cat "$OUT"/*.txt | wc -c) bytes under $OUT"
