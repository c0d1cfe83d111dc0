"""The Open Inference Protocol gRPC definition (grpc_predict_v2.proto) and its generated, committed stubs."""
