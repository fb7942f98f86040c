"""Generated Caffe protobuf messages (see proto/caffe.proto, scripts/gen_proto.py)."""
