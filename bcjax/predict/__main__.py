"""python -m bcjax.predict: see bcjax.predict."""

import sys

from bcjax.predict import main

sys.exit(main())
