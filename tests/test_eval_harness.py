"""Evaluation harness with a fake solver: grading, JSONL, resume, judge orders, summary and table."""

import dataclasses
import json
import re

import pytest

from rema_jax.eval.harness import EvalSettings, evaluate_benchmark, read_samples, run_evaluation
from rema_jax.tasks import builtin
from rema_jax.tasks.types import Task, judge_task


@dataclasses.dataclass
class FakeGrade:
    correct: bool
    extracted: str | None
    timed_out: bool = False
    error: str | None = None


def fake_grade(preds, golds):
    out = []
    for p, g in zip(preds, golds):
        m = re.findall(r"\\boxed\{([^}]*)\}", p)
        out.append(FakeGrade(bool(m) and m[-1] == g, m[-1] if m else None))
    return out


def fake_boxed(text):
    m = re.findall(r"\\boxed\{([^}]*)\}", text)
    return m[-1] if m and m[-1] else None


class FakeSolver:
    """Right on tasks whose index is even, wrong otherwise; counts what it was asked."""

    def __init__(self, tasks, fail_after_calls=None):
        self.index = {t.uid: i for i, t in enumerate(tasks)}
        self.seen = []
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def __call__(self, batch):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        out = []
        for t in batch:
            self.seen.append(t.uid)
            ans = t.answer if self.index[t.uid] % 2 == 0 else "999"
            out.append(
                {
                    "final_answer": f"so \\boxed{{{ans}}}",
                    "messages": [
                        {"role": "meta_thinking", "content": "plan"},
                        {"role": "reasoning", "content": f"so \\boxed{{{ans}}}"},
                    ],
                    "finish_reason": "finished",
                }
            )
        return out


@pytest.fixture
def tasks():
    _, test = builtin.builtin_split(0, 3, seed=1, families=("arithmetic",), levels=(1, 2))
    return test  # 6 tasks: levels 1,1,1,2,2,2


def test_greedy_pass1_records_and_levels(tmp_path, tasks):
    solver = FakeSolver(tasks)
    path = tmp_path / "s.jsonl"
    res = evaluate_benchmark(
        tasks,
        solver,
        benchmark="builtin",
        mode="vrp",
        samples_path=path,
        settings=EvalSettings(batch_size=4, progress=False),
        grade_fn=fake_grade,
        boxed_fn=fake_boxed,
    )
    assert solver.calls == 2
    assert res["num_tasks"] == 6 and res["pass@1"] == pytest.approx(50.0)
    assert res["pass@1_by_level"] == {"1": pytest.approx(200 / 3), "2": pytest.approx(100 / 3)}
    assert res["boxed_rate"] == 100.0
    recs = read_samples(path)
    assert len(recs) == 6
    r0 = recs[0]
    assert r0["uid"] == tasks[0].uid and r0["correct"] is True and r0["extracted"] == tasks[0].answer
    assert r0["messages"][0]["role"] == "meta_thinking" and r0["solver"] == {"finish_reason": "finished"}
    assert r0["question"] == tasks[0].question and r0["gold"] == tasks[0].answer


def test_resume_skips_done_samples(tmp_path, tasks):
    path = tmp_path / "s.jsonl"
    settings = EvalSettings(batch_size=2, progress=False)
    first = FakeSolver(tasks, fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmark(
            tasks,
            first,
            benchmark="b",
            mode="m",
            samples_path=path,
            settings=settings,
            grade_fn=fake_grade,
            boxed_fn=fake_boxed,
        )
    assert len(read_samples(path)) == 4
    with open(path, "a") as f:
        f.write('{"uid": "torn')  # a write cut by the interruption
    second = FakeSolver(tasks)
    res = evaluate_benchmark(
        tasks,
        second,
        benchmark="b",
        mode="m",
        samples_path=path,
        settings=settings,
        grade_fn=fake_grade,
        boxed_fn=fake_boxed,
    )
    assert second.seen == [t.uid for t in tasks[4:]]
    assert res["num_records"] == 6 and res["pass@1"] == pytest.approx(50.0)
    assert len(read_samples(path)) == 6
    third = FakeSolver(tasks)
    evaluate_benchmark(
        tasks,
        third,
        benchmark="b",
        mode="m",
        samples_path=path,
        settings=settings,
        grade_fn=fake_grade,
        boxed_fn=fake_boxed,
    )
    assert third.calls == 0


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"uid": "a", "sample": 0}\nnot json\n{"uid": "b", "sample": 0}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: corrupt"):
        read_samples(path)


def test_multiple_samples_pass_at_k_and_maj(tmp_path):
    t = [Task(uid="q", question="1+1?", answer="2")]
    answers = iter(["2", "3", "3", "2"])

    def solver(batch):
        return [{"final_answer": f"\\boxed{{{next(answers)}}}", "messages": []} for _ in batch]

    res = evaluate_benchmark(
        t,
        solver,
        benchmark="b",
        mode="m",
        settings=EvalSettings(batch_size=3, num_samples=4, ks=(1, 2, 4), progress=False),
        grade_fn=fake_grade,
        boxed_fn=fake_boxed,
    )
    assert res["num_samples"] == 4
    assert res["pass@1"] == pytest.approx(50.0)
    assert res["pass@2"] == pytest.approx(100 * (1 - 1 / 6))
    assert res["maj@1"] == 100.0 and res["maj@2"] == 100.0  # tie 2 vs 3: first seen ("2") wins
    assert res["maj@4"] == 100.0


def test_judge_both_orders():
    pairs = [judge_task(f"p{i}", f"Q{i}", f"ra{i}", f"rb{i}", "A>B" if i % 2 == 0 else "B>A") for i in range(4)]

    def biased_solver(batch):  # always says A: right on A>B pairs, never right in both orders
        return [{"final_answer": "[[A]]", "messages": []} for _ in batch]

    def verdict(text):
        return "A" if "[[A]]" in text else ("B" if "[[B]]" in text else None)

    single = evaluate_benchmark(
        pairs, biased_solver, benchmark="j", mode="m", settings=EvalSettings(progress=False), verdict_fn=verdict
    )
    assert single["accuracy"] == 50.0 and single["score"] == 50.0
    both = evaluate_benchmark(
        pairs,
        biased_solver,
        benchmark="j",
        mode="m",
        settings=EvalSettings(progress=False, judge_both_orders=True),
        verdict_fn=verdict,
    )
    assert both["accuracy"] == 50.0 and both["accuracy_both_orders"] == 0.0 and both["score"] == 0.0

    def fair_solver(batch):  # reads the gold from the responses' names: always right
        return [{"final_answer": "[[A]]" if t.label == "A>B" else "[[B]]", "messages": []} for t in batch]

    fair = evaluate_benchmark(
        pairs,
        fair_solver,
        benchmark="j",
        mode="m",
        settings=EvalSettings(progress=False, judge_both_orders=True),
        verdict_fn=verdict,
    )
    assert fair["accuracy_both_orders"] == 100.0


def test_run_evaluation_writes_summary_and_table(tmp_path, tasks):
    benches = {"builtin-l1": tasks[:3], "builtin-l2": tasks[3:]}

    def perfect(batch):
        return [{"final_answer": f"\\boxed{{{t.answer}}}", "messages": []} for t in batch]

    summary = run_evaluation(
        benches,
        {"VRP": FakeSolver(tasks), "ReMA": perfect},
        tmp_path,
        settings=EvalSettings(progress=False),
        grade_fn=fake_grade,
        boxed_fn=fake_boxed,
    )
    table = (tmp_path / "table.md").read_text()
    assert table.splitlines()[0] == "| Benchmark | VRP | ReMA |"
    assert "| builtin-l1 | 66.67 | 100.00 (+33.33) |" in table
    assert "| builtin-l2 | 33.33 | 100.00 (+66.67) |" in table
    assert "| **Average** | 50.00 | 100.00 (+50.00) |" in table
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["results"]["ReMA"]["builtin-l2"]["pass@1"] == 100.0
    assert summary["table"] == table
    assert (tmp_path / "samples" / "VRP" / "builtin-l1.jsonl").exists()


def test_bad_solver_output_and_duplicate_uids(tasks):
    with pytest.raises(ValueError, match="outputs for"):
        evaluate_benchmark(
            tasks,
            lambda b: [],
            benchmark="b",
            mode="m",
            settings=EvalSettings(progress=False),
            grade_fn=fake_grade,
            boxed_fn=fake_boxed,
        )
    with pytest.raises(ValueError, match="final_answer"):
        evaluate_benchmark(
            tasks,
            lambda b: [{"text": ""} for _ in b],
            benchmark="b",
            mode="m",
            settings=EvalSettings(progress=False),
            grade_fn=fake_grade,
            boxed_fn=fake_boxed,
        )
    with pytest.raises(ValueError, match="duplicate task uid"):
        evaluate_benchmark(
            tasks + tasks[:1],
            FakeSolver(tasks),
            benchmark="b",
            mode="m",
            settings=EvalSettings(progress=False),
            grade_fn=fake_grade,
            boxed_fn=fake_boxed,
        )


def test_real_grader_on_tricky_answers(tmp_path):
    """The default grader (math-verify via rewards.math_grading) on a handful of samples."""
    pytest.importorskip("math_verify")
    mg = pytest.importorskip("rema_jax.rewards.math_grading")
    tasks = [
        Task(uid="f", question="half?", answer="\\frac{1}{2}"),
        Task(uid="n", question="n?", answer="1500"),
        Task(uid="e", question="x?", answer="7"),
    ]
    outs = {"f": "It is \\boxed{\\dfrac{1}{2}}.", "n": "The total is \\boxed{1500}", "e": "I think it is 8."}
    res = evaluate_benchmark(
        tasks,
        lambda b: [{"final_answer": outs[t.uid], "messages": []} for t in b],
        benchmark="b",
        mode="m",
        samples_path=tmp_path / "s.jsonl",
        settings=EvalSettings(progress=False, grade_timeout=20.0),
        grade_fn=lambda p, g: mg.grade_batch(p, g, in_process=True),
    )
    recs = {r["uid"]: r for r in read_samples(tmp_path / "s.jsonl")}
    assert recs["f"]["correct"] and recs["n"]["correct"] and not recs["e"]["correct"]
    assert recs["e"]["boxed"] is None and recs["f"]["boxed"] == "\\dfrac{1}{2}"
    assert res["pass@1"] == pytest.approx(200 / 3) and res["boxed_rate"] == pytest.approx(200 / 3)


def test_shared_math500_through_the_harness(tmp_path, shared_data):
    """MATH500 from the shared file, a gold-echoing solver: math-verify grades every sample correct."""
    from rema_jax.tasks.loaders import load_benchmark

    mg = pytest.importorskip("rema_jax.rewards.math_grading")
    path = shared_data / "math500" / "test.jsonl"
    if not path.exists():
        pytest.skip("math500 absent")
    tasks = load_benchmark("math500", path, limit=20).tasks
    res = evaluate_benchmark(
        tasks,
        lambda b: [{"final_answer": f"\\boxed{{{t.answer}}}", "messages": []} for t in b],
        benchmark="math500",
        mode="gold",
        settings=EvalSettings(progress=False),
        grade_fn=lambda p, g: mg.grade_batch(p, g, in_process=True),
    )
    assert res["num_tasks"] == 20 and res["pass@1"] == 100.0 and res["boxed_rate"] == 100.0


def test_default_judge_verdicts_from_rewards():
    pytest.importorskip("rema_jax.rewards.shaping")
    pairs = [
        judge_task("p0", "Q", "a", "b", "A>B"),
        judge_task("p1", "Q", "a", "b", "B>A"),
        judge_task("p2", "Q", "a", "b", "A>B"),
    ]
    texts = {"p0": "I pick [[A]].", "p1": "Verdict: [[A]]", "p2": "no verdict"}
    res = evaluate_benchmark(
        pairs,
        lambda b: [{"final_answer": texts[t.uid], "messages": []} for t in b],
        benchmark="j",
        mode="m",
        settings=EvalSettings(progress=False),
    )
    assert res["accuracy"] == pytest.approx(100 / 3) and res["no_verdict_rate"] == pytest.approx(100 / 3)
