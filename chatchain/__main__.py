"""``python -m chatchain``: the ``chatchain`` command, e.g. ``python -m chatchain demo``."""

from chatchain.cli import main

if __name__ == "__main__":
    main()
