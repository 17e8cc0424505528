"""What a running job needs around the training step: process groups, faults, metrics and the output-folder guard."""
