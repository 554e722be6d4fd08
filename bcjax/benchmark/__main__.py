"""``python -m bcjax.benchmark``: bcjax.benchmark.cli's ``main``."""

from bcjax.benchmark.cli import main

if __name__ == "__main__":
    main()
