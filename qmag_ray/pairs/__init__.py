"""Pairs of faces to compare: benchmark protocols, generic lists, generated and exhaustive sets.

``sides`` assembles a calibration's fit and held-out pairs from the settings; ``scoring``
scores a pair source into arrays (one Ray task per shard when asked).
"""
