"""`python -m anomalyd`: the `anomalyd` command."""

import sys

from .cli import main

sys.exit(main())
