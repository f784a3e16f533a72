"""Entry script of the frozen bundle: ``inspection-engine [serve|check|evaluate ...]``, serve by default.

Kept apart from ``engine/__main__.py`` so the bundle imports ``engine.__main__`` as a normal module;
``main()`` calls ``multiprocessing.freeze_support()`` first.
"""

import sys

from engine.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
