"""The shared core every side builds on: config access, errors that name a setting,
crash-safe files, adapter arrays and L2 clipping, the privacy units, SecAgg+ settings.
Imports nothing else of the project."""
