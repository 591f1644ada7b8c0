"""Tiny TF Hub-format text modules, made offline the way the hub's own are made.

- `make_sentence_encoder`: like nnlm-en-dim50: a batch of strings in, one embedding per
  string out; words are looked up in a vocabulary file (an asset) with out-of-vocabulary
  buckets and averaged (sqrt-n); `training=True` applies dropout. A `tf.train.Checkpoint`
  with `variables` and `trainable_variables`, the TF Hub convention for reusable models.
- `make_bert_pair`: a BERT-style encoder and its preprocessor, as TF Hub pairs them. The
  preprocessor maps strings to `input_word_ids`, `input_mask` and `input_type_ids`
  (`[CLS] tokens [SEP]`, padded) and exposes `tokenize` and `bert_pack_inputs(segments,
  seq_length)`; the encoder maps that dict to `pooled_output` and `sequence_output`. No
  TF.Text ops, so no extra package is needed.
"""

from __future__ import annotations

from pathlib import Path

DIM = 8
WORDS = ["the", "a", "match", "goal", "team", "won", "score", "player", "oven", "bake", "flour", "sugar",
         "recipe", "dough", "minutes", "salt"]
OOV_BUCKETS = 4
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
MAX_POSITIONS = 16
DEFAULT_SEQ = 10


def _vocabulary(path: Path, words: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words) + "\n")
    return str(path)


def make_sentence_encoder(directory: Path, seed: int = 0) -> Path:
    """Writes the nnlm-like module to `directory`; returns it."""
    import tensorflow as tf

    vocabulary = _vocabulary(Path(directory).parent / f"{Path(directory).name}-vocab.txt", WORDS)

    class SentenceEncoder(tf.train.Checkpoint):
        def __init__(self):
            super().__init__()
            lines = tf.lookup.TextFileInitializer(vocabulary, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                  tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticVocabularyTable(lines, num_oov_buckets=OOV_BUCKETS)
            self.embeddings = tf.Variable(
                tf.random.stateless_normal([len(WORDS) + OOV_BUCKETS, DIM], seed=[seed, 1]), name="embeddings")
            self.variables = [self.embeddings]
            self.trainable_variables = [self.embeddings]
            self.regularization_losses = []

        @tf.function
        def __call__(self, sentences, training=False):
            ids = tf.ragged.map_flat_values(self.table.lookup, tf.strings.split(tf.strings.lower(sentences)))
            vectors = tf.ragged.map_flat_values(tf.gather, self.embeddings, ids)
            count = tf.cast(ids.row_lengths(), tf.float32)[:, None]
            pooled = tf.reduce_sum(vectors, axis=1) / tf.sqrt(tf.maximum(count, 1.0))
            return tf.nn.dropout(pooled, 0.5, seed=1) if training else pooled

    module = SentenceEncoder()
    for training in (False, True):
        module.__call__.get_concrete_function(tf.TensorSpec([None], tf.string), training=training)
    tf.saved_model.save(module, str(directory))
    return Path(directory)


def make_bert_pair(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes `directory/preprocess` and `directory/encoder`; returns them."""
    import tensorflow as tf

    directory = Path(directory)
    vocabulary = _vocabulary(directory / "vocab.txt", SPECIAL + WORDS)

    class Preprocessor(tf.train.Checkpoint):
        def __init__(self):
            super().__init__()
            lines = tf.lookup.TextFileInitializer(vocabulary, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                  tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticHashTable(lines, default_value=1)  # [UNK]
            self.variables, self.trainable_variables, self.regularization_losses = [], [], []

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def tokenize(self, sentences):
            return tf.ragged.map_flat_values(self.table.lookup, tf.strings.split(tf.strings.lower(sentences)))

        @tf.function(input_signature=[[tf.RaggedTensorSpec([None, None], tf.int64)], tf.TensorSpec([], tf.int32)])
        def bert_pack_inputs(self, segments, seq_length):
            ids = segments[0][:, : seq_length - 2]
            batch = tf.shape(ids.row_lengths())[0]
            ids = tf.concat([tf.fill([batch, 1], tf.constant(2, tf.int64)), ids,
                             tf.fill([batch, 1], tf.constant(3, tf.int64))], axis=1)
            word_ids = tf.cast(ids.to_tensor(0), tf.int32)
            word_ids = tf.pad(word_ids, [[0, 0], [0, seq_length - tf.shape(word_ids)[1]]])
            return {"input_word_ids": word_ids, "input_mask": tf.cast(word_ids > 0, tf.int32),
                    "input_type_ids": tf.zeros_like(word_ids)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, sentences):
            return self.bert_pack_inputs([self.tokenize(sentences)], tf.constant(DEFAULT_SEQ))

    class Encoder(tf.train.Checkpoint):
        def __init__(self):
            super().__init__()

            def weight(shape, index, name):
                return tf.Variable(tf.random.stateless_normal(shape, seed=[seed, index], stddev=0.5), name=name)

            self.word = weight([len(SPECIAL) + len(WORDS), DIM], 1, "word_embeddings")
            self.type = weight([2, DIM], 2, "type_embeddings")
            self.position = weight([MAX_POSITIONS, DIM], 3, "position_embeddings")
            self.kernel = weight([DIM, DIM], 4, "transform")
            self.pooler = weight([DIM, DIM], 5, "pooler")
            self.variables = [self.word, self.type, self.position, self.kernel, self.pooler]
            self.trainable_variables = list(self.variables)
            self.regularization_losses = []

        @tf.function
        def __call__(self, inputs, training=False):
            ids, mask = inputs["input_word_ids"], inputs["input_mask"]
            x = (tf.gather(self.word, ids) + tf.gather(self.type, inputs["input_type_ids"])
                 + self.position[None, : tf.shape(ids)[1]])
            x = tf.nn.gelu(x @ self.kernel) * tf.cast(mask, tf.float32)[..., None]
            if training:
                x = tf.nn.dropout(x, 0.3, seed=1)
            # One step of mixing, as attention would: [CLS] plus the mean of the tokens.
            weights = tf.cast(mask, tf.float32)[..., None]
            context = tf.reduce_sum(x * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
            return {"pooled_output": tf.tanh((x[:, 0] + context) @ self.pooler), "sequence_output": x}

    tf.saved_model.save(Preprocessor(), str(directory / "preprocess"))
    encoder = Encoder()
    spec = {key: tf.TensorSpec([None, None], tf.int32) for key in ("input_word_ids", "input_mask", "input_type_ids")}
    for training in (False, True):
        encoder.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(encoder, str(directory / "encoder"))
    return directory / "preprocess", directory / "encoder"


def make_keras_hub_bert(directory: Path, words: list[str], hidden_dim: int = 32, seed: int = 0) -> Path:
    """A tiny KerasHub BERT preset (backbone, WordPiece tokenizer on `words`, classifier
    preprocessor) written by `save_to_preset` to `directory`; returns it."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim, max_sequence_length=MAX_POSITIONS,
    ).save_to_preset(directory)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=MAX_POSITIONS).save_to_preset(directory)
    return Path(directory)
