"""UDI: Unidirectional Dynamic Interaction (registered on import).

``udi.report`` reads result records only; it is imported by the report, which runs in a light
environment without torch, where the method itself is not registered.
"""

import importlib.util

if importlib.util.find_spec("torch") is not None:
    from udi import method  # noqa: F401
