"""The contract between training and serving: the model card schema and the one preprocessing definition.

Both halves import this package; it needs only numpy, Pillow and pydantic (never torch).
"""
