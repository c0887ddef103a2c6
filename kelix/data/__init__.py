"""Data layer: sample schema, shard streaming, image preprocessing, synthetic data, DataModules.

Import from the submodules (``kelix.data.stream``...): this package stays import-light.
"""
