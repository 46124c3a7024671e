"""Self-improvement algorithms: pure losses and advantages (`losses`), the specs the round runs
(`sft`, `grpo`, `preference`; the protocol in `spec`) and the registry of `algorithm.name`s
(`registry`). Formulas and their sources: docs/algorithms.md; how to add one: docs/design.md.
"""
