"""Personal state under --home: the experience store (exchanges, lessons) and the adapter versions.
No MLX import here, so `teach` and `lessons` start fast."""
