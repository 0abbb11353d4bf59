#!/bin/sh
# build.sh - build the chmig test guest reproducibly.
#
#   sh chmig/guest/build.sh [OUTPUT]      (default: guest.bin next to this script)
#
# Assembles guest.S, links it at 0x80000 with guest.ld and flattens it with
# objcopy.  No timestamps, build ids or paths end up in the image, so the
# same binutils produce the same bytes; the intermediates live in a
# temporary directory that is removed afterwards.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/guest.bin"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/guest.o" "$here/guest.S"
ld -m elf_x86_64 -T "$here/guest.ld" --build-id=none -o "$tmp/guest.elf" "$tmp/guest.o"
objcopy -O binary "$tmp/guest.elf" "$tmp/guest.bin"
chmod 0644 "$tmp/guest.bin"
mv "$tmp/guest.bin" "$out"
