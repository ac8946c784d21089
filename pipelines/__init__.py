"""Runnable jobs, one file each: parse arguments, call `model`/`index`, run on Ray."""
