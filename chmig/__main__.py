"""``python -m chmig`` is the ``chmig`` command."""

import sys

from .cli import main

sys.exit(main())
