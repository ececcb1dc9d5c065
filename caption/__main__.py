"""``python -m caption`` (and ``torchrun -m caption``) runs the command line."""

import sys

from caption.cli import main

sys.exit(main())
