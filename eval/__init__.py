"""eval: the same questions through every mode, one side-by-side table."""
