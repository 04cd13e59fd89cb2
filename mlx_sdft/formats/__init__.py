"""Files other tools read or write: the run folder, model sources and adapters, GGUF."""
