"""``python -m privacy.audit``: see :mod:`privacy.audit.cli`."""

import sys

from privacy.audit.cli import main

if __name__ == "__main__":
    sys.exit(main())
