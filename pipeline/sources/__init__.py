"""The load stage: one module per way a user holds a pre-trained model.

Each source is built from `conf/source/*.yaml` and has `load() -> SourceModel`.
"""
