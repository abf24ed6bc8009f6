"""The V2 gRPC messages: ``grpc_predict_v2.proto`` (package ``bnfold.inference``, wire-compatible with
KServe's and Triton's ``inference`` messages; its header says why the package name differs) and the module
generated from it, committed. Regenerate after editing the .proto, from the repository root::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/grpc/protos/grpc_predict_v2.proto

The committed module was generated with grpcio-tools 1.75.1 (protobuf 6.31 gencode), so it needs nothing
newer than the runtime floor in pyproject.toml (protobuf >= 6.31.1); a newer grpcio-tools writes the same
descriptor with higher version stamps, which is all tests/service/test_grpc_proto.py lets differ.
"""
