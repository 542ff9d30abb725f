"""``python -m ghess``: run the worked example (see ``ghess.demo``)."""

import sys

from .demo import main

sys.exit(main(sys.argv[1:]))
