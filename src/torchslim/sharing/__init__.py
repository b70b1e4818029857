"""sharing methods."""
