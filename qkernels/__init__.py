"""The project's GPU kernels (Triton and Gluon) and their torch references.

Named ``qkernels``, not ``kernels``: transformers (5.25 on) depends on Hugging Face's ``kernels``
package, which a top-level ``kernels`` package here would shadow (transformers' model code then fails
to import).
"""
