"""The TTT-Discover agent: entropic objective, state reuse (PUCT) and the test-time training loop."""
