"""parking-gateway: the edge daemon of a car park."""

__version__ = "0.1.0"
