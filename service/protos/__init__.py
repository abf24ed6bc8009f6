"""The V2 gRPC API (package ``inference``): ``grpc_predict_v2.proto`` and the modules generated from it.

The generated files are committed. Regenerate after editing the .proto, from the repository root::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        service/protos/grpc_predict_v2.proto

They were generated with grpcio-tools 1.75.1 (protobuf 6.31 gencode), the oldest generator whose output
needs nothing newer than the runtime floor in pyproject.toml (protobuf >= 6.31.1, grpcio >= 1.75.1); a newer
grpcio-tools writes the same descriptor with higher version stamps (tests/service/test_grpc_proto.py checks
that regenerating changes nothing but those stamps).

Do not import these modules in the same process as ``tritonclient.grpc``: both define ``inference.*`` in
protobuf's default descriptor pool, which refuses a second definition.
"""
