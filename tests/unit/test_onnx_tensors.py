"""Our protobuf walk must agree with the onnx package on every external tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from bench.synth_weights import Dims, base_model, quantize_int8, write_model
from edgeglm.errors import IntegrityError
from edgeglm.onnx_tensors import external_tensors, read_external_tables


def test_matches_onnx_package(tmp_path):
    folder = write_model(quantize_int8(base_model(Dims.tiny())), tmp_path)
    ours = external_tensors(folder / "model.onnx")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert len(ours) == len(model.graph.initializer)
    for mine, ref in zip(ours, model.graph.initializer, strict=True):
        info = {e.key: e.value for e in ref.external_data}
        assert (mine.name, mine.offset, mine.length, mine.location) == (
            ref.name,
            int(info["offset"]),
            int(info["length"]),
            info["location"],
        )
        assert mine.shape == tuple(ref.dims)
        assert mine.dtype == helper.tensor_dtype_to_np_dtype(ref.data_type).name


def test_onnx_saved_external_data_and_subgraphs(tmp_path):
    """A model saved by onnx itself (its own offsets, no explicit length) with an If subgraph."""
    w = numpy_helper.from_array(np.arange(5000, dtype=np.float16), "w_main")
    sub_w = numpy_helper.from_array(np.ones((40, 40), dtype=np.int32), "w_sub")
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["w_sub"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.INT32, [40, 40])],
        [sub_w],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["w_sub"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.INT32, [40, 40])],
    )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph(
        [node], "g", [cond], [helper.make_tensor_value_info("y", TensorProto.INT32, [40, 40])], [w]
    )
    model = helper.make_model(graph)
    convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    tables = read_external_tables(tmp_path)
    names = {t.name: t for t in tables["weights.bin"]}
    assert set(names) == {"w_main", "w_sub"}
    data = (tmp_path / "weights.bin").read_bytes()
    main = names["w_main"]
    assert data[main.offset : main.offset + main.length] == np.arange(5000, dtype=np.float16).tobytes()
    assert names["w_sub"].dtype == "int32" and names["w_sub"].length == 40 * 40 * 4


def test_location_outside_the_folder_is_refused(tmp_path):
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([], "g", [], [], [t])
    onnx.save_model(helper.make_model(g), str(tmp_path / "m.onnx"))
    with pytest.raises(IntegrityError, match="outside"):
        read_external_tables(tmp_path)


@pytest.mark.parametrize(
    "garbage", [b"\xff\xff\xff", b"\x3a\x05abc", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"]
)
def test_garbage_graph_raises_integrity_error(tmp_path, garbage):
    (tmp_path / "m.onnx").write_bytes(garbage)
    with pytest.raises(IntegrityError):
        external_tensors(tmp_path / "m.onnx")
