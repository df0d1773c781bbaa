"""Input pipeline: datasets (``sources``), per-example ops (``preprocess``) and
the deterministic, multi-process batch iterators (``pipeline``).

Everything here runs on numpy, PIL and tensorflow-datasets' array_record data
sources; TensorFlow is never imported.
"""
