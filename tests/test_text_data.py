"""Text data: `data=text_folder`, `data=csv` with `text_column`, `data=tfds` with `text_key`.

The tests write their own short film reviews (the aclImdb layout: `train/neg`, `train/pos`,
`train/unsup`) and CSVs, and prepare their own TFDS data set: no network.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections import Counter

import numpy as np
import pytest

from conftest import compose
from pipeline import config
from pipeline.data.manifest import CsvData
from pipeline.data.text_folder import TextFolderData
from pipeline.errors import ConfigError, DataError

NEG = [
    "The plot wanders for two hours and never arrives anywhere.",
    "I checked my watch more often than I looked at the screen.",
    "Wooden acting, a muddy soundtrack and a twist you can see from the first scene.",
    "The trailer promised a thriller; the film delivered a nap.",
    "Even the dog in the second act seemed bored with the script.",
    "A talented cast wasted on dialogue nobody would ever say out loud.",
    "The editing is so choppy that whole scenes feel missing.",
    "It tries to be clever and ends up merely confusing.",
    "I wanted to like it, but the ending undoes everything before it.",
    "Flat jokes, flat characters and a flat, grey picture.",
]
POS = [
    "A warm, funny film with a heart as big as its landscapes.",
    "The lead gives the performance of her career; I was moved to tears.",
    "Sharp writing and a score that stays with you for days.",
    "Every frame looks like a painting, and the story earns its length.",
    "I laughed from the opening credits to the last line.",
    "A quiet, patient film that rewards your attention.",
    "The best ensemble cast I have seen this year.",
    "Smart, tense and surprising right up to the final shot.",
    "My whole family loved it, grandparents included.",
    "A small story told with great tenderness and wit.",
]
UNSUP = [
    "Saw this on a flight last week; the sound was too low to judge.",
    "Has anyone found the director's cut on disc?",
]
CLASS_OF = {review: "neg" for review in NEG} | {review: "pos" for review in POS}


def write_reviews(root, classes=None):
    """`root/<class>/<i>_<stars>.txt`, one review per file, as in aclImdb."""
    classes = classes or {"neg": NEG, "pos": POS, "unsup": UNSUP}
    for name, reviews in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, review in enumerate(reviews):
            (root / name / f"{i}_{2 if name == 'neg' else 9}.txt").write_text(review, encoding="utf-8")
    return root


def pairs(dataset) -> list[tuple[str, int]]:
    return [(text.decode("utf-8"), int(label)) for text, label in dataset.as_numpy_iterator()]


def _folder(root, **kwargs):
    return TextFolderData(train_dir=str(root), **kwargs).load()


@pytest.fixture(scope="module")
def imdb(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("aclImdb") / "train")


@pytest.fixture(scope="module")
def bundle(imdb):
    return _folder(imdb, class_names=["neg", "pos"], task="binary", seed=0)


def test_texts_arrive_as_strings_labelled_by_their_folder(bundle):
    import tensorflow as tf

    assert bundle.input_kind == "text" and bundle.input_shape == () and not bundle.resizable
    assert bundle.augmentation is None and bundle.task == "binary"
    assert bundle.train.element_spec[0] == tf.TensorSpec((), tf.string)
    seen = []
    for split in ("train", "val", "test"):
        found = pairs(getattr(bundle, split))
        assert len(found) == bundle.num_examples[split]
        assert all(bundle.class_names[label] == CLASS_OF[text] for text, label in found)
        seen += [text for text, _ in found]
    assert sorted(seen) == sorted(NEG + POS)  # every review once, unchanged; no unsup review


def test_class_names_choose_the_subfolders_and_their_order(imdb):
    everything = _folder(imdb)
    assert everything.class_names == ("neg", "pos", "unsup")  # null: every subfolder, sorted
    assert sum(everything.num_examples.values()) == len(NEG + POS + UNSUP)

    flipped = _folder(imdb, class_names=["pos", "neg"], task="binary")
    assert flipped.class_names == ("pos", "neg")
    found = [pair for split in ("train", "val", "test") for pair in pairs(getattr(flipped, split))]
    assert {CLASS_OF[text] for text, label in found if label == 0} == {"pos"}
    assert flipped.skipped_files == ()  # unsup/ is left out unread, not skipped

    with pytest.raises(DataError, match=r"data\.class_names=\['neg', 'positive'\] names folder\(s\) "
                                        r"\['positive'\].*its subfolders are \['neg', 'pos', 'unsup'\]"):
        _folder(imdb, class_names=["neg", "positive"])
    with pytest.raises(DataError, match=r"data\.task=binary needs exactly 2 classes.*\['neg', 'pos', 'unsup'\]"):
        _folder(imdb, task="binary")


def test_splits_are_stratified_and_seeded(imdb, bundle):
    per_class = {split: Counter(label for _, label in pairs(getattr(bundle, split)))
                 for split in ("train", "val", "test")}
    assert per_class == {"train": {0: 6, 1: 6}, "val": {0: 2, 1: 2}, "test": {0: 2, 1: 2}}

    again = _folder(imdb, class_names=["neg", "pos"], seed=0)
    other = _folder(imdb, class_names=["neg", "pos"], seed=1)
    assert again.example_ids == bundle.example_ids
    assert other.example_ids["test"] != bundle.example_ids["test"]
    assert again.fingerprint == bundle.fingerprint != other.fingerprint
    ids = bundle.example_ids
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(
        str(path) for name in ("neg", "pos") for path in (imdb / name).iterdir())
    for split in ("train", "val", "test"):  # each id is the file whose text is at that position
        texts = [text for text, _ in pairs(getattr(bundle, split))]
        assert [open(path, encoding="utf-8").read() for path in ids[split]] == texts


def test_val_dir_and_test_dir_are_read_as_given(tmp_path):
    train = write_reviews(tmp_path / "aclImdb" / "train", {"neg": NEG[:8], "pos": POS[:8]})
    test = write_reviews(tmp_path / "aclImdb" / "test", {"neg": NEG[8:], "pos": POS[8:]})
    split = TextFolderData(train_dir=str(train), test_dir=str(test), val_split=0.25, test_split=0.5).load()
    assert split.num_examples == {"train": 12, "val": 4, "test": 4}  # test_split is ignored
    assert sorted(text for text, _ in pairs(split.test)) == sorted(NEG[8:] + POS[8:])

    val = write_reviews(tmp_path / "aclImdb" / "val", {"neg": NEG[8:9], "pos": POS[8:9]})
    both = TextFolderData(train_dir=str(train), val_dir=str(val), test_dir=str(test)).load()
    assert both.num_examples == {"train": 16, "val": 2, "test": 4}
    assert sorted(text for text, _ in pairs(both.val)) == sorted([NEG[8], POS[8]])

    write_reviews(tmp_path / "aclImdb" / "test", {"meh": ["Fine, I suppose."]})
    with pytest.raises(DataError, match=r"data\.test_dir=.* has class folder\(s\) \['meh'\] that data\.train_dir lacks"):
        TextFolderData(train_dir=str(train), test_dir=str(test)).load()
    # with data.class_names, other folders of test_dir are simply not classes
    chosen = TextFolderData(train_dir=str(train), test_dir=str(test), class_names=["neg", "pos"]).load()
    assert chosen.num_examples["test"] == 4


def test_undecodable_and_empty_files_are_skipped_and_listed(tmp_path, caplog):
    root = write_reviews(tmp_path / "train", {"neg": NEG, "pos": POS})
    latin = root / "pos" / "latin1.txt"
    latin.write_bytes("Un très beau film, émouvant.".encode("latin-1"))  # not valid UTF-8
    (root / "neg" / "empty.txt").write_bytes(b"")
    (root / "neg" / "blank.txt").write_text("  \n\t\n")
    (root / "pos" / "poster.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (root / "pos" / ".notes.txt").write_text("hidden files are not data")
    with caplog.at_level(logging.WARNING):
        bundle = _folder(root)
    assert sorted(bundle.skipped_files) == sorted(
        str(p) for p in (latin, root / "neg" / "empty.txt", root / "neg" / "blank.txt", root / "pos" / "poster.png"))
    assert "skipped 4 of 24 texts" in caplog.text and "not valid utf-8 text" in caplog.text
    assert "latin1.txt" in caplog.text and "only whitespace" in caplog.text
    found = [text for split in ("train", "val", "test") for text, _ in pairs(getattr(bundle, split))]
    assert sorted(found) == sorted(NEG + POS)

    as_latin = _folder(root, encoding="latin-1")  # the key that reads it: the text decodes right
    found = [text for split in ("train", "val", "test") for text, _ in pairs(getattr(as_latin, split))]
    assert "Un très beau film, émouvant." in found
    assert str(latin) not in as_latin.skipped_files


def test_a_class_folder_without_usable_text_is_an_error(tmp_path):
    root = write_reviews(tmp_path / "train", {"neg": NEG, "pos": POS})
    (root / "meh").mkdir()
    (root / "meh" / "1.txt").write_text("   ")
    with pytest.raises(DataError, match=r"the class folder .*meh' has no usable text"):
        _folder(root)
    with pytest.raises(DataError, match=r"data\.train_dir=.*does not exist.*aclImdb/train/neg"):
        _folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "1.txt").write_text("a review not in a class folder")
    with pytest.raises(DataError, match=r"data\.train_dir=.*has no class subfolders: put each class's texts in"):
        _folder(tmp_path / "flat")


def test_max_chars_truncates_each_text(imdb, bundle):
    short = _folder(imdb, class_names=["neg", "pos"], task="binary", max_chars=12)
    assert short.example_ids == bundle.example_ids  # the same files in the same places
    for split in ("train", "val", "test"):
        whole, cut = pairs(getattr(bundle, split)), pairs(getattr(short, split))
        assert cut == [(text[:12], label) for text, label in whole]
        assert all(len(text) == 12 for text, _ in cut)
    assert short.fingerprint != bundle.fingerprint  # other texts, other feature cache
    assert (short.max_chars, bundle.max_chars) == (12, None)  # what the export cuts served texts to


@pytest.mark.parametrize("max_chars", [1, 4, 7, 100])
def test_the_served_cut_is_the_data_stages_cut(max_chars):
    import tensorflow as tf

    from pipeline.data.layers import ServingTexts
    from pipeline.data.text import TextSettings, cut_texts, read_text

    texts = ["Crème brûlée à la française", "naïve café 🍰🍰 ok", "日本語のテキスト", "short", "ﬁ ligature"]
    wanted = [read_text(text.encode("utf-8"), TextSettings(max_chars=max_chars))[0] for text in texts]
    cut = [t.decode("utf-8") for t in cut_texts(tf.constant(texts), max_chars).numpy()]
    assert cut == wanted
    assert [t.decode("utf-8") for t in ServingTexts(max_chars)(tf.constant(texts)).numpy()] == wanted
    assert cut_texts(tf.constant(texts), None).numpy().tolist() == [t.encode("utf-8") for t in texts]


def test_fingerprint_follows_the_bytes_not_the_location(imdb, bundle, tmp_path):
    moved = shutil.copytree(imdb, tmp_path / "elsewhere" / "train")
    same = _folder(moved, class_names=["neg", "pos"], task="binary")
    assert same.fingerprint == bundle.fingerprint

    edited = moved / "pos" / "3_9.txt"
    edited.write_text(POS[3] + " Ten out of ten.")
    changed = _folder(moved, class_names=["neg", "pos"], task="binary")
    assert any(POS[3] + " Ten out of ten." == text for split in ("train", "val", "test")
               for text, _ in pairs(getattr(changed, split)))  # the edit is what a run reads
    assert changed.fingerprint != bundle.fingerprint
    assert _folder(moved, class_names=["neg", "pos"], task="binary", encoding="latin-1").fingerprint != changed.fingerprint


@pytest.mark.parametrize("override,message", [
    ("data.encoding=utf-99", r"^data\.encoding='utf-99' is not a text encoding.*for example utf-8"),
    ("data.encoding=base64", r"^data\.encoding='base64' is not a text encoding"),
    ("data.max_chars=0", r"^data\.max_chars=0: expected a positive number of characters.*seq_length"),
    ("data.max_chars=-5", r"^data\.max_chars=-5: expected a positive"),
])
def test_wrong_text_settings_fail_the_config_check_naming_the_key(override, message, tmp_path):
    cfg = compose(["data=text_folder", "data.train_dir=/data/aclImdb/train", override], tmp_path)
    with pytest.raises(ConfigError, match=message) as caught:
        config.validate(cfg)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=message):  # and when the option is built directly
        TextFolderData(train_dir="/data/aclImdb/train", **{override.split("=")[0][5:]: _value(override)})


def _value(override: str):
    value = override.split("=", 1)[1]
    return int(value) if value.lstrip("-").isdigit() else value


def test_text_settings_that_pass_the_config_check(tmp_path):
    for option, extra in (("text_folder", ["data.train_dir=/data/t", "data.encoding=latin-1", "data.max_chars=500"]),
                          ("csv", ["data.manifest=/data/r.csv", "data.text_column=review", "data.max_chars=500"]),
                          ("tfds", ["data.name=imdb_reviews", "data.text_key=text"])):
        config.validate(compose([f"data={option}", *extra], tmp_path))


# --- data=csv with data.text_column ---------------------------------------------------

def _csv(root, lines, name="reviews.csv"):
    path = root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def test_csv_text_column_reads_the_texts_from_the_cells(tmp_path, caplog):
    rows = [f"{_quoted(text)},{CLASS_OF[text]},{i}" for i, text in enumerate(NEG + POS)]
    rows.insert(3, ',neg,x')  # line 5: an empty text
    rows.insert(8, '"   ",pos,y')  # line 10: only whitespace
    multiline = 'Two lines,\nand a "quoted" word.'
    rows.append(f"{_quoted(multiline)},pos,z")  # a cell over two lines
    manifest = _csv(tmp_path, ["review,sentiment,id", *rows])
    with caplog.at_level(logging.WARNING):
        bundle = CsvData(manifest=str(manifest), text_column="review", label_column="sentiment",
                         task="binary").load()  # no `path` column: none is needed
    assert bundle.input_kind == "text" and bundle.input_shape == () and bundle.class_names == ("neg", "pos")
    assert bundle.skipped_files == (f"{manifest}:5", f"{manifest}:10")
    assert "skipped 2 of 23 texts" in caplog.text and "'review' cells" in caplog.text
    found = [pair for split in ("train", "val", "test") for pair in pairs(getattr(bundle, split))]
    assert sorted(text for text, _ in found) == sorted(NEG + POS + [multiline])
    assert all(bundle.class_names[label] == CLASS_OF.get(text, "pos") for text, label in found)
    assert Counter(label for _, label in pairs(bundle.test)) == {0: 2, 1: 2}  # stratified
    lines = manifest.read_text().splitlines()
    for split in ("train", "val", "test"):  # an id names the line its text is on
        for (text, _), example in zip(pairs(getattr(bundle, split)), bundle.example_ids[split]):
            assert example.startswith(f"{manifest}:")
            assert _quoted(text).splitlines()[-1] in lines[int(example.rsplit(":", 1)[1]) - 1]

    short = CsvData(manifest=str(manifest), text_column="review", label_column="sentiment", max_chars=5).load()
    assert {len(text) for text, _ in pairs(short.train)} == {5}
    def fingerprint(path):
        return CsvData(manifest=str(path), text_column="review", label_column="sentiment",
                       task="binary").load().fingerprint

    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / manifest.name
    moved.write_bytes(manifest.read_bytes())
    assert fingerprint(moved) == bundle.fingerprint  # where the CSV lives is not identity
    moved.write_text(manifest.read_text().replace("Two lines,", "Two lines, edited,"))
    assert fingerprint(moved) != bundle.fingerprint


def test_csv_text_column_with_split_column_and_class_names(tmp_path):
    marks = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    rows = [f"{_quoted(text)},{CLASS_OF[text]},{mark}" for reviews in (NEG, POS)
            for text, mark in zip(reviews, marks)]
    manifest = _csv(tmp_path, ["text,label,split", *rows])
    bundle = CsvData(manifest=str(manifest), text_column="text", split_column="split",
                     class_names=["pos", "neg"]).load()
    assert bundle.class_names == ("pos", "neg")
    for split, start, stop in (("train", 0, 6), ("val", 6, 8), ("test", 8, 10)):
        found = pairs(getattr(bundle, split))
        assert sorted(found) == sorted([(t, 1) for t in NEG[start:stop]] + [(t, 0) for t in POS[start:stop]])


def test_csv_text_column_with_multilabel_gives_multi_hot_vectors(tmp_path):
    films = {
        "A detective chases a forger through the canals of Venice.": "thriller",
        "Two rival chefs fall in love during a baking contest.": "comedy romance",
        "A widower rebuilds his life on a remote island.": "drama",
        "A heist goes wrong and the crew turns on itself.": "thriller drama",
        "A wedding planner keeps losing the rings.": "comedy",
        "Letters between two strangers become a lifelong love.": "romance drama",
    } | {f"{text} (director's cut)": genres for text, genres in {
        "A detective chases a forger through the canals of Venice.": "thriller",
        "Two rival chefs fall in love during a baking contest.": "comedy romance",
        "A widower rebuilds his life on a remote island.": "drama",
        "A heist goes wrong and the crew turns on itself.": "thriller drama",
    }.items()}
    manifest = _csv(tmp_path, ["plot,genres", *(f"{_quoted(t)},{g}" for t, g in films.items())])
    bundle = CsvData(manifest=str(manifest), text_column="plot", label_column="genres", multilabel=True,
                     val_split=0.2, test_split=0.2).load()
    assert bundle.task == "multilabel" and bundle.class_names == ("comedy", "drama", "romance", "thriller")
    found = [(t.decode(), hot) for split in ("train", "val", "test")
             for t, hot in getattr(bundle, split).as_numpy_iterator()]
    assert len(found) == len(films)
    for text, hot in found:
        expected = [float(name in films[text].split()) for name in bundle.class_names]
        assert hot.tolist() == expected and hot.dtype == np.float32


def test_csv_missing_text_column_names_the_key_and_the_columns(tmp_path):
    manifest = _csv(tmp_path, ["review,sentiment", f"{_quoted(NEG[0])},neg", f"{_quoted(POS[0])},pos"])
    with pytest.raises(ConfigError, match=r"^data\.text_column='text' is not a column of data\.manifest=.*; "
                                          r"its columns are \['review', 'sentiment'\]\. Set data\.text_column") as caught:
        CsvData(manifest=str(manifest), text_column="text", label_column="sentiment").load()
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match=r"no column 'label' \(data\.label_column\)"):
        CsvData(manifest=str(manifest), text_column="review").load()


def test_csv_without_text_column_still_reads_images(tmp_path):
    manifest = _csv(tmp_path, ["review,label", f"{_quoted(NEG[0])},neg"])
    with pytest.raises(DataError, match=r"has no column 'path' \(data\.path_column\)"):
        CsvData(manifest=str(manifest)).load()


# --- data=tfds with data.text_key -----------------------------------------------------

HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
NAME = "film_reviews"
BROKEN = {3: b"", 7: "Tr\xe8s bien.".encode("latin-1")}  # train examples that are left out


def _tfds_examples(split: str):
    reviews = {"train": NEG[:6] + POS[:6], "test": NEG[6:] + POS[6:]}[split]
    for index, review in enumerate(reviews):
        text = BROKEN.get(index, review) if split == "train" else review
        yield index, {"text": text, "title": f"review {index}", "label": CLASS_OF[review],
                      "stars": 2 if CLASS_OF[review] == "neg" else 9}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    if not HAS_TFDS:
        pytest.skip("tensorflow-datasets is not installed")
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():

        class FilmReviews(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "text": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["neg", "pos"]),
                    "stars": tfds.features.Tensor(shape=(), dtype=np.int64),
                }))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in ("train", "test")}

            def _generate_examples(self, split):
                yield from _tfds_examples(split)

    data_dir = tmp_path_factory.mktemp("tfds")
    FilmReviews(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def _tfds(data_dir, **kwargs):
    from pipeline.data.tfds import TfdsData

    kwargs = {"name": NAME, "data_dir": str(data_dir), "text_key": "text", "task": "binary",
              "split": {"train": "train", "val": "test[:50%]", "test": "test[50%:]"}, **kwargs}
    return TfdsData(**kwargs).load()


def test_tfds_text_feature_gives_a_text_bundle(tfds_dir, caplog):
    import tensorflow_datasets as tfds

    with caplog.at_level(logging.WARNING):
        bundle = _tfds(tfds_dir)
    assert bundle.input_kind == "text" and bundle.input_shape == () and bundle.class_names == ("neg", "pos")
    assert bundle.num_examples == {"train": 10, "val": 4, "test": 4}  # 12 train examples, 2 left out
    assert "skipped 2 of 20 texts" in caplog.text and "not valid utf-8" in caplog.text
    train = pairs(bundle.train)
    assert sorted(text for text, _ in train) == sorted(t for i, t in enumerate(NEG[:6] + POS[:6]) if i not in BROKEN)
    assert all(bundle.class_names[label] == CLASS_OF[text] for split in ("train", "val", "test")
               for text, label in pairs(getattr(bundle, split)))
    # `<split>:<index>` is the position in the prepared split (TFDS shuffled it when preparing)
    stored = [e["text"] for e in tfds.builder(NAME, data_dir=str(tfds_dir)).as_dataset(
        split="train", shuffle_files=False).as_numpy_iterator()]
    assert sorted(stored[int(s.split(":")[1])] for s in bundle.skipped_files) == sorted(BROKEN.values())
    assert all(s.startswith("train:") for s in bundle.skipped_files)
    assert [stored[int(i.split(":")[1])].decode() for i in bundle.example_ids["train"]] == [t for t, _ in train]

    again, other_key = _tfds(tfds_dir), _tfds(tfds_dir, text_key="title")
    assert again.fingerprint == bundle.fingerprint != other_key.fingerprint
    assert [text for text, _ in pairs(other_key.val)][0].startswith("review ")
    short = _tfds(tfds_dir, max_chars=4)
    assert {len(text) for text, _ in pairs(short.train)} == {4} and short.fingerprint != bundle.fingerprint


def test_tfds_text_key_must_be_a_text_feature(tfds_dir):
    with pytest.raises(DataError, match=r"data\.text_key='review' is not a feature of 'film_reviews'; its "
                                        r"features are \['label', 'stars', 'text', 'title'\]"):
        _tfds(tfds_dir, text_key="review")
    with pytest.raises(DataError, match=r"data\.text_key='stars' of 'film_reviews' is not one string per "
                                        r"example.*its text features are \['text', 'title'\]"):
        _tfds(tfds_dir, text_key="stars")
