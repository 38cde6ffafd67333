"""lstream/demo."""
