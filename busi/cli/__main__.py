"""python -m busi.cli: the `busi` command without its console script (subprocesses, a checkout not installed)."""
import sys

from . import main

sys.exit(main())
