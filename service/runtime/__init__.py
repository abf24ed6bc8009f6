"""Models and their computation: the repository and loading (ONNX Runtime sessions), each model's config,
the compute side of a request (validation, the scheduler or the batcher behind one ``Compute`` protocol,
outputs) and what a model says about itself. Every ONNX Runtime call of the service lives in this package.
"""
