"""Speculative decoding's core: its configuration, the proposers of draft tokens, and the rejection sampler that
verifies them against the target model's distributions (the engine wires them into its steps)."""
