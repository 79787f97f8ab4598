"""``python -m usp_attn <command>``: same as the ``usp-attn`` console script."""

import sys

from usp_attn.cli import main

if __name__ == "__main__":
    sys.exit(main())
