"""EdgeGLM shared kernel: errors, wire protocol, bundle format, pieces, device profiles.

Imported by all three wings (``export``, ``edge_agent``, ``cloud_hub``); depends on nothing heavy.
"""

__version__ = "0.1.0"
