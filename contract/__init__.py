"""The contract between training and serving: the model card schema and the one preprocessing definition (and the
command-line help convention of the tools of both halves, `contract.cli`).

Both halves import this package; it needs only numpy, Pillow and pydantic (never torch).
"""
