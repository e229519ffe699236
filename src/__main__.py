"""`python -m medq` is the `medq` command."""
import sys

from medq.cli import main

sys.exit(main())
