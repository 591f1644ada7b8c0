"""The data stage: one module per kind of input, each with `load() -> DataBundle`."""
