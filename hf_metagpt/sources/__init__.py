"""Where inputs come from: local folders, the Hub (pinned to commits), LoRA adapters."""
