"""``python -m memattr``: the same as the ``memattr`` command."""

import sys

from memattr.cli import main

sys.exit(main())
