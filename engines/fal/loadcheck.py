"""Moved to engines/cloud/loadcheck.py (the child every cloud's LoRA is checked in); kept so
`python -m engines.fal.loadcheck` still runs it."""

import sys

from engines.cloud.loadcheck import check, main

__all__ = ["check", "main"]

if __name__ == "__main__":
    sys.exit(main())
