"""The only package that imports Flower: the Flower glue and the ServerApp/ClientApp modules."""
