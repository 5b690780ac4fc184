"""``python -m halserve``: the same as the ``halserve`` command."""
import sys

from halserve.cli import main

sys.exit(main())
