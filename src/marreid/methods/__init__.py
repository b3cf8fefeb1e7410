"""Adaptation methods: their contract (``base``), the registry of names (``registry``), and one
module per method with its stateful pieces (``mar``, ``cluster_contrast``, ``cluster_memory``).

Nothing is imported here, so the configuration can read the registry's names without
loading a method (import from the modules themselves).
"""
