"""PyTorch in: train a model with BatchNorm, save it as TorchScript, fold it with bnfold, serve it."""
