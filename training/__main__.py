"""``python -m training``: train, test, export and save a model (see training/train.py)."""

import sys

from .train import main

sys.exit(main())
