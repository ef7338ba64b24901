"""The commands' library functions above training, each the body of a `dpokit` command:

    commands  sample, label, train, frontier, generate: run a step and print its summary
    evaluate  reward, win rate and KL(π‖π_ref) of a policy against its reference
    frontier  (KL, reward) points of several runs and checkpoints, CSV and plot
    chat      `dpokit chat` and `dpokit generate`

Sampling and judging themselves are `dpokit.generation`'s; the experiments that chain these steps
(`make demo`, `make paper`) are `dpokit.experiments`'.
"""
