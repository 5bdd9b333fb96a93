"""TFDS loader: a tiny builder prepared in tmp_path (array_record, no TensorFlow), offline failures."""

import time

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from rema_jax.tasks.tfds_loader import TFDSUnavailableError, load_tfds, tfds_builder  # noqa: E402


class RemaTinyMath(tfds.core.GeneratorBasedBuilder):
    """Three train and two test problems; `rationale` ends in a GSM8K-style '#### n'."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "answer": tfds.features.Text(), "rationale": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples(0, 3), "test": self._generate_examples(10, 2)}

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            yield (
                i,
                {
                    "question": f"What is {i} + 1?",
                    "answer": str(i + 1),
                    "rationale": f"{i} + 1 = {i + 1}\n#### {i + 1}",
                },
            )


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = RemaTinyMath(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def test_reads_prepared_split(prepared_dir):
    tasks = load_tfds("rema_tiny_math", prepared_dir, "test")
    assert [(t.question, t.answer) for t in tasks] == [("What is 10 + 1?", "11"), ("What is 11 + 1?", "12")]
    assert tasks[0].uid == "rema_tiny_math/test/0" and tasks[0].source == "tfds:rema_tiny_math"
    assert len(load_tfds("rema_tiny_math", prepared_dir, "train", limit=2)) == 2


def test_answer_fn(prepared_dir):
    tasks = load_tfds(
        "rema_tiny_math", prepared_dir, "train", answer_fn=lambda ex: ex["rationale"].rsplit("####", 1)[1]
    )
    assert [t.answer for t in tasks] == ["1", "2", "3"]


def test_missing_field_and_split(prepared_dir):
    with pytest.raises(ValueError, match=r"field 'problem' missing"):
        load_tfds("rema_tiny_math", prepared_dir, "test", question_key="problem")
    with pytest.raises(TFDSUnavailableError, match="no split 'validation'"):
        load_tfds("rema_tiny_math", prepared_dir, "validation")


def test_unprepared_or_unknown_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(TFDSUnavailableError, match="not prepared"):
        tfds_builder("math_qa", tmp_path)  # in the catalog, never prepared here: no download attempted
    with pytest.raises(TFDSUnavailableError, match="neither registered nor prepared"):
        tfds_builder("no_such_dataset_xyz", tmp_path)
    with pytest.raises(TFDSUnavailableError, match="does not exist"):
        tfds_builder("math_qa", tmp_path / "missing")
    assert time.monotonic() - start < 10


def test_unregistered_name_reads_from_data_dir(prepared_dir, tmp_path):
    """A dataset prepared elsewhere (class not imported) is found from its files alone."""
    import shutil

    shutil.copytree(prepared_dir / "rema_tiny_math", tmp_path / "rema_tiny_copy")
    (tmp_path / "rema_tiny_copy" / "1.0.0" / "dataset_info.json").write_text(
        (tmp_path / "rema_tiny_copy" / "1.0.0" / "dataset_info.json")
        .read_text()
        .replace('"rema_tiny_math"', '"rema_tiny_copy"')
    )
    for f in (tmp_path / "rema_tiny_copy" / "1.0.0").iterdir():
        if f.name.startswith("rema_tiny_math"):
            f.rename(f.with_name(f.name.replace("rema_tiny_math", "rema_tiny_copy")))
    tasks = load_tfds("rema_tiny_copy", tmp_path, "test")
    assert [t.answer for t in tasks] == ["11", "12"]


def test_tfrecord_format_is_refused_with_reason(prepared_dir, tmp_path):
    """A tfrecord dataset (prepared where TensorFlow exists) is refused, not half-read."""
    import shutil

    shutil.copytree(prepared_dir / "rema_tiny_math", tmp_path / "rema_tiny_math")
    info = tmp_path / "rema_tiny_math" / "1.0.0" / "dataset_info.json"
    text = info.read_text()
    assert '"fileFormat": "array_record"' in text
    info.write_text(text.replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
    with pytest.raises(TFDSUnavailableError, match="needs TensorFlow"):
        load_tfds("rema_tiny_math", tmp_path, "test")
