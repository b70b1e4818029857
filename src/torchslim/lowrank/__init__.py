"""lowrank methods."""
