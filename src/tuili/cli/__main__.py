"""`python -m tuili.cli`: the same as the `tuili` command."""

import sys

from tuili.cli import main

sys.exit(main())
