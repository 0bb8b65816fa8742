"""Store recipes: the fixed ways the book trains the models that several chapters reuse."""
