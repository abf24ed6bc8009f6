"""Models and their computation: the repository and loading (ONNX Runtime sessions), each model's config,
the compute side of a request (its run in ``work``: checks, ONNX Runtime, outputs; the scheduler or the batcher
behind one ``Compute`` protocol) and what a model says about itself. Every ONNX Runtime call of the service
lives in this package.
"""
