"""``python -m qubes_gpu_share.broker``: the dom0 broker daemon."""

import sys

from .main import main

sys.exit(main())
