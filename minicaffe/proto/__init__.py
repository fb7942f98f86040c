"""Generated Caffe protobuf messages (see proto/caffe.proto, scripts/gen_proto.py).

The descriptor helpers below read a field's cardinality on every supported protobuf runtime
(4.21 to 7.x): ``FieldDescriptor.label`` is all that 4.21 has, and 7.x removed it in favour of
the ``is_repeated``/``is_required`` properties.
"""


def is_repeated(field) -> bool:
    """True for a ``repeated`` field (``FieldDescriptor``), whatever the protobuf version."""
    value = getattr(field, "is_repeated", None)
    return bool(value) if value is not None else field.label == field.LABEL_REPEATED


def is_required(field) -> bool:
    """True for a proto2 ``required`` field, whatever the protobuf version."""
    value = getattr(field, "is_required", None)
    return bool(value) if value is not None else field.label == field.LABEL_REQUIRED


def is_packed(field) -> bool:
    """True when a repeated scalar field is written packed (caffe.proto says ``[packed = true]``)."""
    value = getattr(field, "is_packed", None)
    return bool(value) if value is not None else is_repeated(field) and field.GetOptions().packed
