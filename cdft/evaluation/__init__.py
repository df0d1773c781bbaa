"""Style-transfer evaluation: metrics, the content x style grid evaluator and its inputs.

* :mod:`cdft.evaluation.metrics`: pure ``jnp`` metrics (Gram matrices, the paper's
  style distance, content loss, SSIM).
* :mod:`cdft.evaluation.grid`: stylizes every content with every style for each
  model and writes the tables (markdown, JSON) and contact sheets.
* :mod:`cdft.evaluation.sources`: the models and the teacher VGG named on the
  command line (``launch/evaluate.py``).
"""
