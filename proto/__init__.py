"""driftwarden.proto: the gRPC API, one package per version (v1: protobuf package
driftwarden.v1)."""
