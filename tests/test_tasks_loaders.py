"""File loaders: every layout on fixture files written here, bad records, and the shared files."""

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rema_jax.tasks import loaders
from rema_jax.tasks.loaders import BadRecordError, last_boxed_content, load_benchmark


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so $\\boxed{5}$", "5"),
        ("\\boxed{\\frac{1}{2}} then \\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 12 done", "12"),
        ("no box", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


def test_math_style_answer_and_boxed_solution(tmp_path):
    f = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"problem": "1+1?", "answer": "2", "level": "Level 3", "type": "Algebra", "unique_id": "u1"},
            {"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": 2, "subject": "Prealgebra"},
            {"question": "Q?", "answer": 27.0},
        ],
    )
    b = load_benchmark("math", f)
    assert [t.answer for t in b.tasks] == ["2", "\\frac{1}{2}", "27"]
    assert [t.level for t in b.tasks] == [3, 2, None]
    assert [t.subject for t in b.tasks] == ["Algebra", "Prealgebra", None]
    assert b.tasks[0].uid == "math/u1" and b.tasks[1].uid == "math/1"
    assert b.stats.loaded == 3 and b.stats.skipped == 0


def test_gsm8k_strips_commas(tmp_path):
    f = _jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "3 * 500 = <<>>1500\n#### 1,500"}])
    assert load_benchmark("gsm8k", f).tasks[0].answer == "1500"


def test_olympiad_lists_and_gaokao_dollars(tmp_path):
    f = _jsonl(
        tmp_path / "o.jsonl",
        [
            {"question": "Q1", "final_answer": ["$2$"]},
            {"question": "Q2", "final_answer": "['3', '\\\\frac{1}{2}']"},
        ],
    )
    assert [t.answer for t in load_benchmark("olympiadbench", f).tasks] == ["2", "3, \\frac{1}{2}"]
    g = _jsonl(tmp_path / "k.jsonl", [{"question": "Q", "answer": "$\\{x|x<1\\}$"}])
    assert load_benchmark("gaokao2023en", g).tasks[0].answer == "\\{x|x<1\\}"


def test_minerva_takes_the_last_box(tmp_path):
    f = _jsonl(tmp_path / "mm.jsonl", [{"problem": "P", "solution": "a \\boxed{1} b \\boxed{1.6} cm", "idx": 4}])
    t = load_benchmark("minerva_math", f).tasks[0]
    assert (t.answer, t.uid) == ("1.6", "minerva_math/4")


def test_verl_parquet_nested_ground_truth(tmp_path):
    rows = [
        {
            "question": "Q0",
            "reward_model": {"ground_truth": "118", "style": "rule"},
            "level": 5,
            "subject": "Algebra",
            "subset": "MATH",
            "prompt": [{"role": "user", "content": "Q0 prompt"}],
        },
        {
            "question": None,
            "reward_model": {"ground_truth": "4", "style": "rule"},
            "level": 3,
            "subject": None,
            "subset": "MATH",
            "prompt": [{"role": "user", "content": "From prompt"}],
        },
    ]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    b = load_benchmark("rema_parquet", path)
    assert [(t.question, t.answer, t.level, t.source) for t in b.tasks] == [
        ("Q0", "118", 5, "MATH"),
        ("From prompt", "4", 3, "MATH"),
    ]
    assert b.tasks[0].uid != b.tasks[1].uid


def test_judge_pairs_and_rewardbench_layout(tmp_path):
    f = _jsonl(
        tmp_path / "j.jsonl",
        [{"pair_id": "p1", "question": "Q", "response_A": "x", "response_B": "y", "label": "B>A", "source": "mmlu"}],
    )
    t = load_benchmark("judgebench", f).tasks[0]
    assert (t.kind, t.answer, t.label, t.subject, t.uid) == ("judge", "B", "B>A", "mmlu", "judgebench/p1")
    r = _jsonl(tmp_path / "rb.jsonl", [{"prompt": "P", "chosen": "good", "rejected": "bad", "subset": "chat"}])
    t = load_benchmark("rewardbench", r).tasks[0]
    assert (t.response_a, t.response_b, t.answer) == ("good", "bad", "A")


@pytest.mark.parametrize(
    "record,field,message",
    [
        ({"question": "Q"}, "answer", "missing"),
        ({"question": "Q", "answer": "   "}, "answer", "empty"),
        ({"answer": "3"}, "problem or question", "missing"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, record, field, message):
    f = _jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, record])
    with pytest.raises(BadRecordError) as e:
        load_benchmark("math", f)
    assert e.value.where == f"{f}:2" and e.value.field == field
    assert f"{f}:2" in str(e.value) and message in str(e.value)


def test_gsm8k_without_marker_and_bad_judge_label(tmp_path):
    f = _jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "no marker 5"}])
    with pytest.raises(BadRecordError, match=r"g.jsonl:1: field 'answer': no '####"):
        load_benchmark("gsm8k", f)
    j = _jsonl(tmp_path / "j.jsonl", [{"question": "Q", "response_A": "a", "response_B": "b", "label": "tie"}])
    with pytest.raises(BadRecordError, match=r"j.jsonl:1: field 'label'"):
        load_benchmark("judgebench", j)


def test_non_utf8_and_bad_json(tmp_path):
    f = tmp_path / "raw.jsonl"
    f.write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n{bad json\n\n')
    with pytest.raises(BadRecordError, match=r"raw.jsonl:2: not valid UTF-8"):
        load_benchmark("math", f)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = load_benchmark("math", f, skip_bad_records=True)
    assert b.stats.loaded == 1 and b.stats.skipped == 2 and b.stats.records == 3 and b.stats.blank_lines == 1
    assert "raw.jsonl:3: bad JSON" in b.stats.skip_reasons[1]
    assert any("skipped 2 of 3" in str(x.message) for x in w)


def test_duplicate_uid_is_an_error(tmp_path):
    f = _jsonl(
        tmp_path / "d.jsonl",
        [{"problem": "a", "answer": "1", "unique_id": "x"}, {"problem": "b", "answer": "2", "unique_id": "x"}],
    )
    with pytest.raises(BadRecordError, match=r"d.jsonl:2: field 'id': duplicate uid"):
        load_benchmark("math", f)


def test_unknown_name_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope", tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError):
        load_benchmark("math", tmp_path / "x.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_benchmark("math", tmp_path / "x.csv")


def test_json_list_and_limit(tmp_path):
    f = tmp_path / "l.json"
    f.write_text(json.dumps([{"problem": f"p{i}", "answer": str(i)} for i in range(5)]))
    assert [t.answer for t in load_benchmark("math", f, limit=2).tasks] == ["0", "1"]


def test_several_files_by_list_or_glob(tmp_path):
    a = _jsonl(tmp_path / "b_alg.jsonl", [{"problem": "a0", "answer": "0"}, {"problem": "a1", "answer": "1"}])
    g = _jsonl(tmp_path / "a_geo.jsonl", [{"problem": "g0", "answer": "2", "unique_id": "g/0"}])
    (tmp_path / "notes.txt").write_text("not data")
    b = load_benchmark("math", [a, str(g)])  # list order is kept
    assert [t.question for t in b.tasks] == ["a0", "a1", "g0"]
    assert b.stats.files == [str(a), str(g)] and b.stats.records == b.stats.loaded == 3
    # files without ids keep distinct fallback uids: the record index runs on across files
    c = _jsonl(tmp_path / "c.jsonl", [{"problem": "c0", "answer": "3"}])
    assert [t.uid for t in load_benchmark("math", [a, c]).tasks] == ["math/0", "math/1", "math/2"]
    b = load_benchmark("math", str(tmp_path / "*_*.jsonl"), limit=2)  # a glob: sorted matches
    assert b.stats.files == [str(g), str(a)] and [t.question for t in b.tasks] == ["g0", "a0"]
    b = load_benchmark("math", (str(tmp_path / "a_*.jsonl"), a))  # globs inside a list
    assert [t.question for t in b.tasks] == ["g0", "a0", "a1"]
    with pytest.raises(ValueError, match="more than once"):  # the same file twice is loud
        load_benchmark("math", [a, str(tmp_path / "b_*.jsonl")])


def test_glob_matching_nothing_or_empty_list_is_an_error(tmp_path):
    pattern = str(tmp_path / "math_train" / "*.jsonl")
    with pytest.raises(FileNotFoundError, match="matched no files") as e:
        load_benchmark("math", pattern)
    assert pattern in str(e.value)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        load_benchmark("math", [_jsonl(tmp_path / "x.jsonl", [{"problem": "p", "answer": "1"}]), pattern])
    with pytest.raises(ValueError, match="no files given"):
        load_benchmark("math", [])


# Record counts from /work/shared/data/README.md; `bad` are records whose gold answer is empty in
# the upstream file (found by this loader; they are skipped and counted, never dropped silently).
SHARED = [
    ("math500", "math500/test.jsonl", 500, 0),
    ("gsm8k", "gsm8k/test.jsonl", 1319, 0),
    ("gsm8k", "gsm8k/train.jsonl", 7473, 0),
    ("math_train", "math_train/algebra.jsonl", 1744, 0),
    ("math_train", "math_train/counting_and_probability.jsonl", 771, 0),
    ("math_train", "math_train/geometry.jsonl", 870, 0),
    ("math_train", "math_train/intermediate_algebra.jsonl", 1295, 0),
    ("math_train", "math_train/number_theory.jsonl", 869, 2),
    ("math_train", "math_train/prealgebra.jsonl", 1205, 0),
    ("math_train", "math_train/precalculus.jsonl", 746, 0),
    ("aime24", "aime24/test.jsonl", 30, 0),
    ("amc23", "amc23/test.jsonl", 40, 0),
    ("minerva_math", "minerva_math/test.jsonl", 272, 0),
    ("olympiadbench", "olympiadbench/test.jsonl", 675, 0),
    ("gaokao2023en", "gaokao2023en/test.jsonl", 385, 2),
    ("judgebench", "judgebench/gpt.jsonl", 350, 0),
    ("judgebench", "judgebench/claude.jsonl", 270, 0),
    ("rema_parquet", "rema_public/train_lv3to5_8k.parquet", 8523, 2),
    ("rema_parquet", "rema_public/test500.parquet", 500, 0),
    ("rema_parquet", "rema_public/train_minimal_all_types.parquet", 133, 0),
    ("rema_parquet", "rema_public/overall_math_test.parquet", 3251, 4),
    ("rema_overall_jsonl", "rema_public/overall_math_all_test_data.jsonl", 3221, 4),
]


@pytest.mark.parametrize("name,rel,records,bad", SHARED, ids=[r[1] for r in SHARED])
def test_shared_files_record_counts(shared_data, name, rel, records, bad):
    path = shared_data / rel
    if not path.exists():
        pytest.skip(f"{path} absent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_benchmark(name, path, skip_bad_records=True)
    assert b.stats.records == records
    assert b.stats.skipped == bad, b.stats.skip_reasons
    assert b.stats.loaded == records - bad
    assert len({t.uid for t in b.tasks}) == len(b.tasks)
    if bad:
        with pytest.raises(BadRecordError):
            load_benchmark(name, path)


MATH_TRAIN_SUBJECTS = {
    "algebra": 1744,
    "counting_and_probability": 771,
    "geometry": 870,
    "intermediate_algebra": 1295,
    "number_theory": 869,
    "prealgebra": 1205,
    "precalculus": 746,
}


def test_shared_math_train_all_seven_subjects(shared_data):
    """MATH train = 7,500 problems in 7 subject files; the single-turn paper config trains on all.

    Skips without ../shared/data (the fixture), but a missing subject file there is a failure."""
    missing = [s for s in MATH_TRAIN_SUBJECTS if not (shared_data / "math_train" / f"{s}.jsonl").is_file()]
    assert not missing, f"{shared_data / 'math_train'} lacks {missing}"
    pattern = str(shared_data / "math_train" / "*.jsonl")
    with pytest.raises(BadRecordError, match=r"number_theory.jsonl:850: field 'solution'"):
        load_benchmark("math_train", pattern)  # upstream "$\\boxed{}$ primes": an empty gold answer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_benchmark("math_train", pattern, skip_bad_records=True)
    assert len(b.stats.files) == 7 and b.stats.records == 7500
    assert b.stats.skipped == 2 and b.stats.loaded == 7498, b.stats.skip_reasons
    by_subject = {}
    for t in b.tasks:
        by_subject[t.uid.split("/")[2]] = by_subject.get(t.uid.split("/")[2], 0) + 1
    assert by_subject == {**MATH_TRAIN_SUBJECTS, "number_theory": 869 - 2}


@pytest.mark.parametrize(
    "config,train,test",
    [("paper_single_turn", (7500, 7498), (500, 500)), ("paper_multi_turn", (8523, 8521), (500, 500))],
)
def test_paper_configs_data_loads(shared_data, config, train, test):
    """Each paper config's train/test paths (relative to the repository root, the launchers' cwd)
    load as configured: single-turn = all of MATH train, multi-turn = MATH L3-5 8.5k."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(config, root / "configs" / f"{config}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.get_config().data
    for path, (records, loaded) in ((data.train_path, train), (data.test_path, test)):
        paths = [path] if isinstance(path, str) else list(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = load_benchmark(
                data.benchmark, [root / p for p in paths], skip_bad_records=data.get("skip_bad_records", False)
            )
        assert (b.stats.records, b.stats.loaded) == (records, loaded), path


def test_shared_overall_parquet_subsets(shared_data):
    path = shared_data / "rema_public/overall_math_test.parquet"
    if not path.exists():
        pytest.skip("absent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tasks = load_benchmark("rema_parquet", path, skip_bad_records=True).tasks
    counts = {}
    for t in tasks:
        counts[t.source] = counts.get(t.source, 0) + 1
    # README: gsm8k 1319, olympiadbench 675, MATH500 500, gaokao2023en 385, minerva_math 272, amc23 40,
    # aime24 30, aime25 30 (minus the 4 empty-answer rows: 1 MATH500, 3 others).
    assert sum(counts.values()) == 3247 and counts["gsm8k"] == 1319 and counts["aime25"] == 30


def test_registry_is_extensible():
    with pytest.raises(ValueError, match="already registered"):
        loaders.register_benchmark("math", loaders.parse_math)
