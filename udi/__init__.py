"""UDI: Unidirectional Dynamic Interaction (registered on import)."""
