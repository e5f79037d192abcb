"""``python -m miscnet`` is the ``miscnet`` command."""

import sys

from miscnet.cli.main import main

sys.exit(main())
