"""The only package that imports Flower (with ``clients/`` and ``server/``)."""
