"""Caffe's file formats around the generated ``caffe_pb2`` bindings (``minicaffe/proto``): prototxt text
with the V0/V1 upgrades (prototxt.py), the binary wire encoding of blobs (wire.py) and Datum records
(datum.py). The databases that hold Datums are read and written in ``minicaffe.data``."""
