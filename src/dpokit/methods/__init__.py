"""Training methods: what each one adds to the shared loop in `dpokit.trainer` (its data, its models, its
batch → loss and metrics). A method is a class with the attributes and methods of `dpo.DPO`."""
