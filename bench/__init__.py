"""`make bench`: every figure measured side by side in one run on the same model and prompts.
`python -m bench --help`."""
