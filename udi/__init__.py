"""UDI: Unidirectional Dynamic Interaction (registered on import)."""

from udi import method  # noqa: F401
