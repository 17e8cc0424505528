"""The project's command-line tools, inside the package so installed console scripts find them.

`relora-convert`, `relora-inspect`, `relora-prepare-data` and `relora-train-tokenizer`
(pyproject `[project.scripts]`, dispatched by `relora_dist.cli`) call the `main(argv)` of
`convert_ckpt`, `inspect_ckpt`, `prepare_data` and `train_tokenizer`; `tools/*.py` in a checkout
are thin wrappers around the same functions.
"""
