"""After a merge: verify its files, evaluate per-task loss, compare methods."""
