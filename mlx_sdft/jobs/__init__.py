"""One entry point per command: check the input, open the model, call the algorithm, write the results."""
