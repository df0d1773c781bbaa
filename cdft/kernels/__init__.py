"""Kernels outside XLA, for backends where XLA's own are slow.

* :mod:`cdft.kernels.conv`: a drop-in ``conv_general_dilated`` for the models.
  Inside :func:`cdft.kernels.conv.cpu_convolutions` (the trainer enters it from
  ``config.cpu_conv``), float32 NHWC convolutions traced for a CPU backend run
  on oneDNN (forward, input gradient and kernel gradient as XLA FFI custom
  calls, ``onednn_conv.cc``); elsewhere, and always on GPU and TPU, it is
  ``jax.lax.conv_general_dilated``.
* :mod:`cdft.kernels.build`: compiles ``onednn_conv.cc`` once per machine (a
  C++ compiler and the ``cdft[onednn]`` extra: oneDNN's library and headers
  from PyPI) into the cdft cache and registers its handlers with XLA.
"""
