"""``python -m service [serve|check|evaluate ...]``; serve when no command is given."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
