"""``python -m ppml_fast``: the same as the ``ppml-fast`` command."""

import sys

from ppml_fast.cli import main

sys.exit(main())
