"""Algorithm runtimes of the inner module (see ``base`` for the contract)."""
