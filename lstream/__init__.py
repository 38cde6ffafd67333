"""lstream."""
