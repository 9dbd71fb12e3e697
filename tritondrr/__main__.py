"""``python -m tritondrr``: the command line (see ``tritondrr.cli``)."""

import sys

from .cli import main

sys.exit(main())
