"""Non-SOP baselines from the paper, registered as a sopkit plugin through entry points."""
