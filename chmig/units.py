"""Sizes every layer shares: the page and the binary units (one definition, imported everywhere)."""

from __future__ import annotations

#: The page size of guest memory, of KVM's dirty log and of userfaultfd (x86-64, 4 KiB pages).
PAGE_SIZE = 4096

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
