"""Runnable experiments behind ``kiln scale`` and ``kiln mup``: they train models, so unlike
``kiln.planning`` (pure math) they import torch — but only inside the functions that train."""
