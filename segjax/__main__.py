"""`python -m segjax` is the `segjax` command."""
import sys

from segjax.cli import main

sys.exit(main())
