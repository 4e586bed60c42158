"""The sans-I/O core: the wire format and the relay state, no I/O."""
