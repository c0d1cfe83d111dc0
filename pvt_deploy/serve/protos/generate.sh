#!/usr/bin/env bash
# Regenerates grpc_predict_v2_pb2.py / _pb2.pyi / _pb2_grpc.py from grpc_predict_v2.proto (run from anywhere;
# needs grpcio-tools, in the [dev] extra). The stubs are committed, so installing pvt-deploy[serve] needs no protoc.
#
# One change after protoc: the messages go into a private descriptor pool instead of protobuf's process-wide
# default one. tritonclient.grpc (and KServe) register the same `inference.*` message names in the default pool,
# and protobuf refuses a second definition of a name ("duplicate symbol"), so without this a process could not
# import both the server and Triton's client. Message names never travel on the wire (only the service and method
# path, /inference.GRPCInferenceService/ModelInfer, and the field numbers), so clients see no difference.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    pvt_deploy/serve/protos/grpc_predict_v2.proto
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(/' \
    pvt_deploy/serve/protos/grpc_predict_v2_pb2.py
grep -q '_descriptor_pool.DescriptorPool().AddSerializedFile' pvt_deploy/serve/protos/grpc_predict_v2_pb2.py
