"""The ``qpki`` command groups, one module per concern; ``qpki.cli`` adds them to ``main``."""
