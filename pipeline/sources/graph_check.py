"""A SavedModel graph stored in a `.keras` file is code: what it may do before it is loaded.

`SavedModelLayer` stores its SavedModel inside the `.keras` archive and restores it when Keras
rebuilds the layer (`source=run`, `source=keras_file`, `keras.saving.load_model` of an
export's `model.keras`). Keras' safe mode refuses Python code in such a file, but a
SavedModel's graph is TensorFlow ops, and some ops read and write files, reach the network
or call Python. Anyone who can edit the file (a checkpoint in a shared run directory, a
model from a colleague's store) could hide them in the layer's call.

`check_saved_model` reads `saved_model.pb` without loading it and refuses a graph whose
restored functions can reach such ops, following every function they call. The saver
functions every SavedModel holds (`SaveV2`, `RestoreV2`, ...) are not flagged: the TF2 loader
restores variables with its own saver, and nothing in the object graph calls them.

SavedModels that the user names directly (`source=hub`, `source=saved_model`) are not
checked: naming a model on the command line trusts it, as TensorFlow's security model does
(a model is a program; running an untrusted one is running untrusted code). A config read
back from a store (`pipeline.rerun`) names them for the user, so there they are checked too
(`config_from_store`, `check_named`), unless the user passed `--allow-unsafe`.

Example:
    >>> unsafe_ops("/tmp/unpacked/assets/layers/functional/layers/hub")
    ['ReadFile']
    >>> with trusted_graphs():  # what source.allow_unsafe=true does
    ...     model = keras.saving.load_model("model.keras")
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SourceError

# Ops that reach outside the process: files, the network, Python. Names, not classes: a
# graph is data, and an op that this TensorFlow does not register fails at load anyway.
_FILES = {
    "ReadFile", "WriteFile", "MatchingFiles", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
    "ImmutableConst", "FileSystemSetConfiguration",
    "Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice", "MergeV2Checkpoints",
    "DTensorRestoreV2", "LoadAndRemapMatrix", "GenerateVocabRemapping",
    "TextLineDataset", "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset",
    "LMDBDataset", "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset",
    "CacheDataset", "CacheDatasetV2", "SaveDataset", "SaveDatasetV2", "LoadDataset", "DistributedSave",
    "SnapshotDataset", "SnapshotDatasetV2", "SnapshotChunkDataset", "SnapshotDatasetReader",
    "SnapshotNestedDatasetReader", "ListSnapshotChunksDataset", "DatasetToTFRecord",
    "ExperimentalDatasetToTFRecord", "DatasetFromGraph", "RecordInput",
    "TextLineReader", "TextLineReaderV2", "TFRecordReader", "TFRecordReaderV2",
    "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "WholeFileReader", "WholeFileReaderV2",
    "LMDBReader",
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary",
    "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
    "WriteRawProtoSummary", "ImportEvent", "FlushSummaryWriter",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary",
    "DumpTensor", "CalibrationStatisticsSaver",
}
_NETWORK = {
    "DataServiceDataset", "DataServiceDatasetV2", "DataServiceDatasetV3", "DataServiceDatasetV4",
    "RegisterDataset", "RegisterDatasetV2", "RemoteCall",
    "RpcServer", "RpcServerStart", "RpcServerRegister", "RpcClient", "RpcCall", "RpcCheckStatus",
    "RpcGetValue", "DeleteRpcFutureResource",
}
_PYTHON = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
_UNSAFE = _FILES | _NETWORK | _PYTHON
_TABLE_FROM_FILE = {"InitializeTableFromTextFile", "InitializeTableFromTextFileV2"}


def _reads_a_file_by_attr(node: Any) -> bool:
    """Ops that are safe unless an attribute names a file."""
    attr = node.attr
    if node.op == "PrintV2":
        return attr["output_stream"].s.startswith(b"file")
    if node.op in ("DecodeProtoV2", "EncodeProto"):
        return attr["descriptor_source"].s not in (b"", b"local://")
    if node.op == "FixedUnigramCandidateSampler":
        return bool(attr["vocab_file"].s)
    return False


def unsafe_ops(directory: str | Path) -> list[str]:
    """The ops in the SavedModel at `directory` that touch files, the network or Python, sorted.

    Reads `saved_model.pb` (or `.pbtxt`, as TensorFlow does) and follows the functions the
    restored objects hold, and every function they call (`f`, `then_branch`, `body`,
    `branches`, ...), plus the custom gradients that fine-tuning runs. A table read from a
    file passes when the file is one of the SavedModel's own assets. A SavedModel without an
    object graph (TF1) is reported as such: loading it runs its own saver graph.
    """
    meta = _meta_graph(Path(directory))
    if meta is None:
        return ["<a TF1 graph, which runs whole at load>"]
    library = {function.signature.name: function for function in meta.graph_def.library.function}
    objects = meta.object_graph_def
    found: set[str] = set()
    found.update(_assets_outside(meta))
    pending = [(name, _asset_args(name, library, objects)) for name in sorted(_roots(meta))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, asset_args = pending.pop()
        if (name, asset_args) in seen or name not in library:
            continue
        seen.add((name, asset_args))
        function = library[name]
        nodes = {node.name: node for node in function.node_def}
        for node in function.node_def:
            if node.op in _UNSAFE or _reads_a_file_by_attr(node):
                found.add(node.op)
            elif node.op in _TABLE_FROM_FILE and _origin(node.input, nodes) not in asset_args:
                found.add(node.op)
            pending += [(callee, _passed_assets(node, callee, asset_args, nodes, library))
                        for callee in _callees(node, library)]
    return sorted(found)


def _passed_assets(node: Any, callee: str, asset_args: frozenset[str], nodes: dict[str, Any],
                   library: dict[str, Any]) -> frozenset[str]:
    """The parameters of `callee` that `node` binds to this function's asset arguments.

    A SavedModel saved again after loading (an export, a `.keras` file re-saved once its
    source folder is gone) passes a vocabulary file's asset down through call ops
    (`StatefulPartitionedCall`, or the function as the op itself); what a called function
    receives from an asset argument is that asset, and nothing else is.
    """
    direct = node.op == callee or (node.op in ("PartitionedCall", "StatefulPartitionedCall")
                                   and node.attr["f"].func.name == callee)
    if not asset_args or not direct:
        return frozenset()
    given = [name for name in node.input if not name.startswith("^")]
    params = [arg.name for arg in library[callee].signature.input_arg]
    return frozenset(param for param, name in zip(params, given) if _traced(name, nodes) in asset_args)


@dataclass
class _Scope:
    trusted: bool
    refused: list[SourceError] = field(default_factory=list)


_SCOPE: ContextVar[_Scope | None] = ContextVar("pipeline_graph_scope", default=None)


@contextmanager
def checked_graphs(allow_unsafe: bool = False) -> Iterator[list[SourceError]]:
    """Within: SavedModels restored from `.keras` files are checked, unless `allow_unsafe`.

    Yields the refusals raised inside, first first: Keras wraps an error raised while it
    restores a layer into a message of its own, so a source re-raises the refusal as is.
    """
    scope = _Scope(trusted=allow_unsafe)
    token = _SCOPE.set(scope)
    try:
        yield scope.refused
    finally:
        _SCOPE.reset(token)


def trusted_graphs():
    """Within: load `.keras` files whose SavedModels touch files or run Python (trust them).

    Example:
        >>> with trusted_graphs():
        ...     model = keras.saving.load_model("model.keras")
    """
    return checked_graphs(allow_unsafe=True)


_FROM_STORE: ContextVar[bool] = ContextVar("pipeline_config_from_store", default=False)
_STORE_FIX = "Pass --allow-unsafe on the command line only if you trust the model and the store."


@contextmanager
def config_from_store() -> Iterator[None]:
    """Within: the config came from a store (`pipeline.rerun`), so the SavedModels it names
    (`source.handle`, `source.path`, `source.preprocessor`) are data from there too, and
    `check_named` checks them as the SavedModels in `.keras` files are checked."""
    token = _FROM_STORE.set(True)
    try:
        yield
    finally:
        _FROM_STORE.reset(token)


def check_named(directory: str | Path, where: str) -> None:
    """A SavedModel that the config names, before it is loaded: trusted (the user named it),
    unless the config came from a store (`config_from_store`); then as `check_saved_model`."""
    if _FROM_STORE.get():
        check_saved_model(directory, f"{where}, named by the stored config,", fix=_STORE_FIX)


def check_saved_model(directory: str | Path, where: str, fix: str | None = None) -> None:
    """Raise SourceError naming `where` and the ops, unless trusted or the graph is safe."""
    scope = _SCOPE.get()
    if scope is not None and scope.trusted:
        return
    ops = unsafe_ops(directory)
    if not ops:
        return
    fix = fix or ("Pass source.allow_unsafe=true on the command line (in Python, load inside "
                  "pipeline.sources.graph_check.trusted_graphs()) only if you trust the file.")
    error = SourceError(
        f"{where} runs TensorFlow ops that read or write files, reach the network or run Python "
        f"({', '.join(ops)}), and loading the file would run them. {fix}"
    )
    if scope is not None:
        scope.refused.append(error)
    raise error


def _meta_graph(directory: Path) -> Any:
    """The one TF2 meta graph, or None when there is none (TF1: the loader runs its graph)."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    binary, text = directory / "saved_model.pb", directory / "saved_model.pbtxt"
    try:
        if binary.is_file():  # the order TensorFlow's loader reads them in
            saved_model.ParseFromString(binary.read_bytes())
        else:
            text_format.Parse(text.read_text(), saved_model)
    except (OSError, message.DecodeError, text_format.ParseError) as error:
        raise SourceError(
            f"{directory} holds no readable saved_model.pb ({error}); the file that stored it "
            "is damaged. Save the model again."
        ) from error
    metas = saved_model.meta_graphs
    if len(metas) != 1 or not metas[0].HasField("object_graph_def"):
        return None
    return metas[0]


def _roots(meta: Any) -> set[str]:
    """The functions the restored objects can call, and the custom gradients training calls."""
    objects = meta.object_graph_def
    names = set(objects.concrete_functions)
    for node in objects.nodes:
        kind = node.WhichOneof("kind")
        if kind == "function":
            names.update(node.function.concrete_functions)
        elif kind == "bare_concrete_function":
            names.add(node.bare_concrete_function.concrete_function_name)
        elif kind == "captured_tensor":
            names.add(node.captured_tensor.concrete_function)
    library = meta.graph_def.library
    names.update(gradient.gradient_func for gradient in library.gradient)
    names.update(gradient.gradient_func for gradient in library.registered_gradients)
    return names


def _callees(node: Any, library: dict[str, Any]) -> list[str]:
    """The functions a node calls: as its op, or in any function-valued attribute."""
    callees = [node.op] if node.op in library else []
    for value in node.attr.values():
        if value.HasField("func"):
            callees.append(value.func.name)
        callees += [function.name for function in value.list.func]
    return callees


def _asset_args(name: str, library: dict[str, Any], objects: Any) -> frozenset[str]:
    """The arguments of a restored function that the loader binds to the SavedModel's assets."""
    if name not in library or name not in objects.concrete_functions:
        return frozenset()
    args = [arg.name for arg in library[name].signature.input_arg]
    bound = objects.concrete_functions[name].bound_inputs
    first = len(args) - len(bound)  # captures come after the call's own inputs
    return frozenset(
        args[first + index]
        for index, node_id in enumerate(bound)
        if first + index >= 0
        and node_id < len(objects.nodes)
        and objects.nodes[node_id].WhichOneof("kind") == "asset"
    )


def _origin(inputs: Any, nodes: dict[str, Any]) -> str:
    """Where a table's file name comes from, through `Identity` nodes: an argument or a node."""
    return _traced(inputs[1] if len(inputs) > 1 else "", nodes)


def _traced(name: str, nodes: dict[str, Any]) -> str:
    """The argument or node an input comes from, through `Identity` nodes."""
    name = name.split(":")[0]
    for _ in range(len(nodes) + 1):
        node = nodes.get(name)
        if node is None or node.op != "Identity" or not node.input:
            return name
        name = node.input[0].split(":")[0]
    return name


def _assets_outside(meta: Any) -> set[str]:
    """A note for each asset file name that leads out of the SavedModel's assets/ directory."""
    outside = set()
    for asset in meta.asset_file_def:
        name = asset.filename
        normal = posixpath.normpath(name.replace("\\", "/"))
        if normal.startswith(("/", "../")) or normal == "..":
            outside.add(f"<asset {name!r} outside assets/>")
    return outside
