"""``python -m kds_hook.cli``: the same as the ``kds-hook`` command."""

import sys

from . import main

sys.exit(main())
