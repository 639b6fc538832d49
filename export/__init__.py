"""Checkpoint -> engine conversion (tte-export)."""
