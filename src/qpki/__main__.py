"""Allow ``python -m qpki`` as an alias of the ``qpki`` console script."""

from qpki.cli import main

if __name__ == "__main__":
    main()
