"""The stages of a job, as plain functions: train -> prune -> fine-tune -> evaluate."""
