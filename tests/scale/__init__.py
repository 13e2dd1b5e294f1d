"""Scale tests: parallel layouts, faults and resharding of the trainer (gloo, tiny model)."""
