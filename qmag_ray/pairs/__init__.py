"""Pairs of faces to compare: benchmark protocols, generic lists, generated and exhaustive sets."""
