"""`python -m shardkv.cli ...`: the same as the `shardkv` console script."""

import sys

from shardkv.cli import main

sys.exit(main())
