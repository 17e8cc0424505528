"""The project's commands other than pretraining, one module each: its logic and its `main(argv)`,
which returns the exit status. pyproject `[project.scripts]` points straight at these (relora-convert,
relora-inspect, relora-prepare-data, relora-train-tokenizer); `tools/*.py` in a checkout are shims
that run the same `main`, for the paths README documents.
"""
