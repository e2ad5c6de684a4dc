"""tf.train.Example, the payload of every record, and the ImageNet feature schema built on it.

The message types are declared here from TensorFlow's example.proto / feature.proto (same field
numbers, so the bytes are what TensorFlow writes) in a private descriptor pool, which avoids a
TensorFlow dependency and cannot clash with TensorFlow's own registration when both are imported.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _message(name: str, *fields: tuple[str, int, int, int, str | None]) -> descriptor_pb2.DescriptorProto:
    """A message descriptor from (name, number, type, label, type_name) tuples."""
    msg = descriptor_pb2.DescriptorProto(name=name)
    for field_name, number, type_, label, type_name in fields:
        field = msg.field.add(name=field_name, number=number, type=type_, label=label)
        if type_name:
            field.type_name = type_name
    return msg


def _build_pool() -> descriptor_pool.DescriptorPool:
    """Declare BytesList, FloatList, Int64List, Feature, Features and Example (package tensorflow)."""
    rep, opt = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
    proto = descriptor_pb2.FileDescriptorProto(name="imagenet_pipeline/example.proto", package="tensorflow")
    proto.syntax = "proto3"  # proto3: repeated numbers are packed, as in TensorFlow's feature.proto
    proto.message_type.extend(
        [
            _message("BytesList", ("value", 1, _F.TYPE_BYTES, rep, None)),
            _message("FloatList", ("value", 1, _F.TYPE_FLOAT, rep, None)),
            _message("Int64List", ("value", 1, _F.TYPE_INT64, rep, None)),
        ]
    )
    feature = _message(
        "Feature",
        ("bytes_list", 1, _F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
        ("float_list", 2, _F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
        ("int64_list", 3, _F.TYPE_MESSAGE, opt, ".tensorflow.Int64List"),
    )
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = _message("Features", ("feature", 1, _F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry"))
    entry = _message(
        "FeatureEntry",
        ("key", 1, _F.TYPE_STRING, opt, None),
        ("value", 2, _F.TYPE_MESSAGE, opt, ".tensorflow.Feature"),
    )
    entry.options.map_entry = True
    features.nested_type.append(entry)
    example = _message("Example", ("features", 1, _F.TYPE_MESSAGE, opt, ".tensorflow.Features"))
    proto.message_type.extend([feature, features, example])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


Example = message_factory.GetMessageClass(_build_pool().FindMessageTypeByName("tensorflow.Example"))

# The TensorFlow ImageNet schema (inception/data/build_imagenet_data.py), which public shards use.
ENCODED, FORMAT, LABEL, SYNSET = "image/encoded", "image/format", "image/class/label", "image/class/synset"
FILENAME, HEIGHT, WIDTH = "image/filename", "image/height", "image/width"
CHANNELS, COLORSPACE = "image/channels", "image/colorspace"


def encode(features: dict[str, bytes | str | int]) -> bytes:
    """Serialise one Example of scalar features: bytes/str become bytes_list, int becomes int64_list."""
    example = Example()
    for key, value in features.items():
        feature = example.features.feature[key]
        if isinstance(value, int):
            feature.int64_list.value.append(value)
        else:
            feature.bytes_list.value.append(value.encode() if isinstance(value, str) else value)
    # deterministic=True sorts the map keys, so the same image always gives the same bytes.
    return example.SerializeToString(deterministic=True)


def decode(data: bytes) -> dict[str, list]:
    """Parse one serialised Example into {feature name: list of values}."""
    example = Example.FromString(data)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = list(getattr(feature, kind).value) if kind else []
    return out


def image_example(
    encoded: bytes,
    label: int,
    synset: str,
    filename: str,
    height: int,
    width: int,
    channels: int,
    colorspace: str,
) -> bytes:
    """One ImageNet record in the TensorFlow schema; the label is 1-based (0 is background)."""
    return encode(
        {
            ENCODED: encoded,
            FORMAT: "JPEG",
            LABEL: label,
            SYNSET: synset,
            FILENAME: filename,
            HEIGHT: height,
            WIDTH: width,
            CHANNELS: channels,
            COLORSPACE: colorspace,
        }
    )
