"""``python -m kdhpc.teacher.cache``: the command line of :mod:`kdhpc.teacher.cache`.

A module of its own so that running it does not re-execute the library module that
``kdhpc.teacher`` has already imported (runpy would warn and hold two copies of it).
"""

import sys

from kdhpc.teacher.cache import main

sys.exit(main())
