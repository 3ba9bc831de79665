"""`python -m sspo`: the `sspo` command."""

import sys

from sspo.cli import main

sys.exit(main())
