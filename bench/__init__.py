"""`make bench`: the broker side by side with a direct call, LiteLLM's proxy and Portkey's gateway."""
