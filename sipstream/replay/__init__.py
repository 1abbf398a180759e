"""Export, import and replay of recorded runs."""
