"""``python -m cacheaug_engine.cli``: the cacheaug command."""

from cacheaug_engine.cli.main import main

raise SystemExit(main())
