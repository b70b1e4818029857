"""nas methods."""
