"""Examples: how the bundled default model was trained, and ways to use bnfold."""
