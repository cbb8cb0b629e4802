"""``python -m chatchain``: the demo chat session (see the README)."""

import sys

from chatchain._demo import main

if __name__ == "__main__":
    sys.exit(main())
