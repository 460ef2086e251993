"""`make bench`: the broker side by side with a direct call and with LiteLLM's proxy."""
