"""Running the engine: the local supervisor, workers, ingest and status."""
