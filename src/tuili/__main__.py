"""`python -m tuili ...` (and `torchrun --nproc-per-node N -m tuili distill ...`) runs the command line."""

import sys

from tuili.cli import main

sys.exit(main())
