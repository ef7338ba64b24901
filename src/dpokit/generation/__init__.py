"""Sampling and judging, below training: prompt files and chat templates (`prompts`), the sampler and
`dpokit sample` (`sampling`), judges (`judges`, `llm_judge`), scores → preference pairs (`pairs`), their
settings (`settings`), JSON Lines files (`jsonl`), and what a policy generates while it trains
(`training_samples`). Methods use it (PPO's rollouts); it imports nothing from training."""
