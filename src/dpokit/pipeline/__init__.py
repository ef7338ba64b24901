"""The DPO paper's controlled-sentiment experiment as reusable steps (Rafailov et al. 2023, §6.1).

    sample    the starting model writes N completions per prompt, with their log-probs   (sample.py)
    judge     a scorer maps (prompt, completion) to a float reward                        (judges.py)
    label     scored completions of one prompt become preference pairs                   (pairs.py)
    train     `dpokit train` on those pairs
    evaluate  reward, win rate and KL(π‖π_ref) of a policy against its reference          (evaluate.py)
    frontier  (KL, reward) points of several runs and checkpoints, CSV and plot           (frontier.py)

`commands.py` exposes each step as a `dpokit` sub-command; `demo.py` runs them end to end on the
embedded model and the bundled movie-review openings (`make demo`).
"""
