"""`python -m fxsurgery.cli`, as the `fxsurgery` script."""
import sys

from fxsurgery.cli import main

sys.exit(main())
