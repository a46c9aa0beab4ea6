"""Pruning: methods (one module each), masks, schedules, accounting and surgery."""
