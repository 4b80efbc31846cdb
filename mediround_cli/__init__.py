"""Thin click commands around the ``mediround`` library."""
