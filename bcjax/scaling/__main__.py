"""``python -m bcjax.scaling ...``: see bcjax.scaling."""

from bcjax.scaling.cli import main

if __name__ == "__main__":
    main()
