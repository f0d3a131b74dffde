"""The TTT-Discover agent: policy, samplers (PUCT reuse), entropic objective, LoRA trainer, agents, CLI.

Import from the modules (`discover_agent.agents`, `discover_agent.sampler`, ...); this package stays light so
that `discover envs` or the samplers do not pay for importing transformers.
"""
