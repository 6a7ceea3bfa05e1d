"""`python -m cacheaug_engine.bench ...` - same as `cacheaug bench ...`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
