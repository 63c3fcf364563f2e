"""``python -m cola`` (and ``torchrun -m cola``) is the ``cola`` command."""

import sys

from .cli import main

sys.exit(main())
