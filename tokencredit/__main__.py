"""`python -m tokencredit ...` (and `torchrun -m tokencredit train ...`) = the `tokencredit` command."""

import sys

from tokencredit.cli import main

sys.exit(main())
