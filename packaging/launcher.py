"""Entry script of the frozen bundle: ``inspection-engine [serve|check|evaluate ...]``, serve by default.

Kept apart from ``service/__main__.py`` so the bundle imports ``service.cli`` as a normal module;
``main()`` calls ``multiprocessing.freeze_support()`` first.
"""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
