"""``python -m caption`` (and ``torchrun -m caption``) runs the command line."""

import sys

from caption.commands.main import main

sys.exit(main())
