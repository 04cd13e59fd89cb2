"""`mlx-sdft serve`: the OpenAI-compatible server that answers with the current adapters and keeps every exchange."""
