"""What a run records: its manifest and the learner's consumption log (read by replay)."""
