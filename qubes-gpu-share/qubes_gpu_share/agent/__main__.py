"""``python -m qubes_gpu_share.agent``: the agent daemon (agent/main.py)."""

import sys

from .main import main

sys.exit(main())
