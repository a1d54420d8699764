"""``python -m training.text``: train, test, export and save a text model (see train.py)."""

import sys

from .train import main

sys.exit(main())
