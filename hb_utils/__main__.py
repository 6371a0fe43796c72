"""``python -m hb_utils`` = the ``hb`` command."""

import sys

from hb_utils.cli import main

sys.exit(main())
