"""Who may call and how often: client keys, budgets' admission, rate limits, the response cache."""
