"""``chmig demo``: the main job a newcomer runs first."""

from __future__ import annotations

import argparse

from . import selfcheck


def main_demo(args: argparse.Namespace) -> int:
    """For now the loopback self-check; the KVM live-migration demo replaces it."""
    return 0 if selfcheck.run() else 1
