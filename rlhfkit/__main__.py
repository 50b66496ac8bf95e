"""`python -m rlhfkit ...`: the same command as `rlhfkit ...`."""

import sys

from rlhfkit.cli import main

sys.exit(main())
