"""Data files shipped inside the package: the tiny Zero-1-to-3 prior (``tiny-zero123/``)."""
