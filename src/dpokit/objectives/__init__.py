"""Preference objectives: `registry` says what each one needs and which options apply (torch-free),
`losses` holds the pure loss functions and builds the configured objective from them."""
