"""The DPO paper's experiments as commands, composed of the commands' library functions
(`dpokit.pipeline.commands`): `demo` (`make demo`: sample, label, train, frontier) and `paper` (`make paper`:
DPO beside SFT, Unlikelihood, a reward model + PPO, PPO-GT and Best-of-N on one reward-KL frontier)."""
