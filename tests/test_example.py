"""tf.train.Example bytes match TensorFlow's wire format, and the ImageNet schema round-trips."""

from pipeline.format import example


def test_wire_format_matches_tensorflow_field_numbers():
    # Example{features{feature{key:"a" value{int64_list{value:1}}}}}, encoded by hand from
    # TensorFlow's example.proto / feature.proto: Example.features=1, Features.feature=1 (map),
    # entry key=1 value=2, Feature.int64_list=3, Int64List.value=1 (packed).
    assert example.encode({"a": 1}) == bytes.fromhex("0a0c0a0a0a016112051a030a0101")
    # bytes_list is Feature field 1: value "hi" -> 0a 04 0a 02 'h' 'i'
    assert example.encode({"b": b"hi"}) == bytes.fromhex("0a0d0a0b0a016212060a040a026869")


def test_serialisation_is_deterministic_whatever_the_key_order():
    a = example.encode({"x": 1, "y": b"2", "z": "3"})
    b = example.encode({"z": "3", "x": 1, "y": b"2"})
    assert a == b


def test_image_example_round_trip_uses_the_tf_imagenet_schema():
    data = example.image_example(b"\xff\xd8jpeg", 17, "n01440764", "n01440764_10026.JPEG", 375, 500, 3, "RGB")
    features = example.decode(data)
    assert features == {
        "image/encoded": [b"\xff\xd8jpeg"],
        "image/format": [b"JPEG"],
        "image/class/label": [17],
        "image/class/synset": [b"n01440764"],
        "image/filename": [b"n01440764_10026.JPEG"],
        "image/height": [375],
        "image/width": [500],
        "image/channels": [3],
        "image/colorspace": [b"RGB"],
    }
