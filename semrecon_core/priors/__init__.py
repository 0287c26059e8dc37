"""Priors of the reconstruction.

The ``Prior`` protocol (``base``), total variation (``tv``), the semantic contrastive prior (``semantic``,
``contrastive``, ``bank``) and the factory that builds them from a configuration and keeps encoders and
banks loaded per process (``factory``).
"""
