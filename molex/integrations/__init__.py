"""Optional integrations with other training stacks (import the submodule you need: ``molex.integrations.hf``)."""
