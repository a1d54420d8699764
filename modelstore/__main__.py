"""``python -m modelstore list|show|promote|rollback``: see ``modelstore/cli.py``."""

import sys

from .cli import main

sys.exit(main())
