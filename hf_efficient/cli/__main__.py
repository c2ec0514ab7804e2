"""``python -m hf_efficient.cli`` = the ``hf-efficient`` console script."""
import sys

from . import main

sys.exit(main())
