"""Compatibility layer: the only part of pureflax that imports flax or equinox.

The converters and the Equinox and Flax linen forms of the model live here.
"""
