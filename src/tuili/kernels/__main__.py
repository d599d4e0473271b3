"""`python -m tuili.kernels`: build tuili's CPU kernels now (set-up does), and say how long it took."""

import sys

from tuili.kernels.build import main

sys.exit(main())
