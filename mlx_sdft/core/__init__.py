"""The algorithm: examples, prompts, sampling, scoring, the teacher, the losses and the loop. Arrays and token ids in, arrays out."""
