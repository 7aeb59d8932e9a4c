"""`python -m pool.cli ...` is the `pool` command."""
import sys

from pool.cli.main import main

sys.exit(main())
