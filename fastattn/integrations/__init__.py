"""Glue between fastattn and the libraries that call attention for you.

Each integration is a submodule that imports its library only when used, so ``import fastattn``
never needs them: :mod:`fastattn.integrations.transformers` (Hugging Face transformers).
"""
