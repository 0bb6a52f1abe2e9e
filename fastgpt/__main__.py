"""`python -m fastgpt ...` is the `fastgpt` command."""

import sys

from fastgpt.cli import main

sys.exit(main())
