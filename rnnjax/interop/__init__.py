"""Interoperability with other frameworks (:mod:`rnnjax.interop.torch`: PyTorch's recurrent modules)."""
