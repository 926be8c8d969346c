"""What a model is: where it lives, its identity, its headers, its cached metadata."""
