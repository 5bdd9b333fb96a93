"""Every prompt text used by the ReMA rollouts, in one place.

Two families, quoted from /work/shared/reference/rema-spec.md:

* ``"paper"``: the ReMA paper, App. G (single-turn VRP, MRP, MAMRP high/low, LLM-as-a-Judge);
* ``"code"``: the official repo ``ziyuwan/ReMA-public`` (``prompt/math/{vrp,single_turn_mamrp,
  multi_turn_mamrp}.py`` and the user templates built in ``vllm_rollout_spmd.py``).

The paper's single-turn texts are the single-turn default; the code's texts are the multi-turn
default (paper App. G.2.2 has the same multi-turn text, so ``"paper"`` multi-turn == ``"code"``).

User templates are ``str.format`` templates over the question fields (``{question}``, and for the
judge ``{answer_a}``/``{answer_b}``) plus ``{instruction}`` (the meta-thinking agent's first message)
for the reasoning agent. System prompts are used verbatim (never formatted), so the code's literal
``\\boxed{{}}`` quirk survives.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Literal, Mapping

Mode = Literal["vrp", "mrp", "single_turn", "multi_turn"]
Variant = Literal["paper", "code"]
TaskKind = Literal["math", "judge"]

META_THINKING = "meta_thinking"
REASONING = "reasoning"
SINGLE = "single"
ROLES = (META_THINKING, REASONING, SINGLE)

FINISH_FLAG = "[FINISH]"  # prompt/__init__.py in the official repo

# --------------------------------------------------------------------------------------------
# Paper, App. G.1.2 (single-turn math).
# --------------------------------------------------------------------------------------------
_PAPER_MAMRP_HIGH_LINES = (
    "You are a math expert specialized in solving mathematical problems, you need to teach a "
    "weaker agent with minimal capability in math how to solve a problem step-by-step.",
    "Your task is to provide a high-level solution plan for the given problem, in order to guide "
    "a low-level math solving agent to solve the problem.",
    "You can not directly answer the question. You'll be punished if you include any answer in your response.",
    "You need to first think deeply in mind and output your final instruction.",
)
PAPER_MAMRP_HIGH_SYSTEM = "\n".join(_PAPER_MAMRP_HIGH_LINES)
PAPER_MAMRP_HIGH_USER = "Here is the question:\n{question}"
PAPER_MAMRP_LOW_SYSTEM = (
    "You are a math expert tasked with solving problems step by step. Follow the provided "
    "instructions precisely, showing all reasoning and intermediate steps. Present the final "
    "answer within \\boxed{}."
)
PAPER_MAMRP_LOW_USER = (
    "Here is the question and instructions: [Question] {question} [End of Question] "
    "[Provided Instruction] {instruction} [End of Instruction]"
)
PAPER_VRP_SYSTEM = (
    "You are a math expert tasked with solving problems step by step. Present the final answer within \\boxed{}."
)
PAPER_VRP_USER = "Here is the question:\n{question}"
# The PDF conversion reads "within boxed}."; we restore the evident "\boxed{}".
PAPER_MRP_SYSTEM = (
    "You are a math expert tasked with solving problems. When solving a problem, your first task "
    "is to provide a high-level solution plan as an instruction. Then you need to follow the "
    "provided instructions precisely, showing all reasoning and intermediate steps. Finally, you "
    "must present the final answer within \\boxed{}."
)
PAPER_MRP_USER = "Here is the question: {question}"

# --------------------------------------------------------------------------------------------
# Official code, single-turn (prompt/math/single_turn_mamrp.py, prompt/math/vrp.py).
# --------------------------------------------------------------------------------------------
# Same text as the paper's high-level prompt, but the first line keeps a trailing space.
CODE_ST_MTA_SYSTEM = _PAPER_MAMRP_HIGH_LINES[0] + " \n" + "\n".join(_PAPER_MAMRP_HIGH_LINES[1:])
# Not an f-string in the repo: the model literally sees the double braces.
CODE_ST_RA_SYSTEM = (
    "You are a math expert tasked with solving problems step by step. Follow the provided "
    "instructions precisely, showing all reasoning and intermediate steps.\nPresent the final "
    "answer within \\boxed{{}}."
)
CODE_VRP_SYSTEM = (
    "You are a math expert tasked with solving problems step by step. \nPresent the final answer within \\boxed{}."
)
# The code feeds the raw ``question`` column as the user message.
CODE_MTA_USER = "{question}"
CODE_RA_USER = "Question:\n{question}\n\nInstruction:\n{instruction}"
CODE_VRP_USER = "{question}"

# --------------------------------------------------------------------------------------------
# Official code, multi-turn (prompt/math/multi_turn_mamrp.py; paper App. G.2.2 is identical).
# --------------------------------------------------------------------------------------------
CODE_MT_MTA_SYSTEM = (
    "You are a meta-think agent that represents human high-level think process, when solving a "
    "question, you will have a discussion with human, each time you think about what to do next: "
    "e.g. \n- Exploring multiple angles and approaches\n- Breaking down the solution into clear "
    "steps\n- Continuously reflecting on intermediate results honestly and adapt your strategy as "
    "you progress\n- Backtracking when necessary\n- Requesting exploration of multiple solutions "
    "individually\n- Finally confirm the answer with the tag [FINISH]\n"
)
CODE_MT_RA_SYSTEM = (
    "Please reason step by step follow the given instruction, when asked to finalize your answer, "
    "put your answer within \\boxed{}"
)

# --------------------------------------------------------------------------------------------
# Paper, App. G.1.3 (LLM-as-a-Judge, EvalPlanner style). No judge code was released and the spec
# quotes the low-level system prompt with an ellipsis: the sentences around the quoted ones
# ("Your evaluation should ... step-by-step. Avoid copying the plan ..." and the verdict format)
# are our wording, in the same style.
# --------------------------------------------------------------------------------------------
PAPER_JUDGE_HIGH_SYSTEM = (
    "We want to evaluate the quality of the responses provided by AI assistants to the user "
    "question displayed below. For that, your task is to help us build an evaluation plan that "
    "can then be executed to assess the response quality. Whenever appropriate, you can choose to "
    "also include a step-by-step reference answer as part of the evaluation plan."
)
PAPER_JUDGE_HIGH_USER = "[User Question] {question} [End of User Question]"
PAPER_JUDGE_LOW_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. Your evaluation should be performed by "
    "following the provided evaluation plan step-by-step. Avoid copying the plan when doing the "
    "evaluation. Do not let the order or the length of the responses influence your evaluation. "
    'After your evaluation, output your final verdict by strictly following this format: "[[A]]" '
    'if assistant A is better, "[[B]]" if assistant B is better.'
)
PAPER_JUDGE_LOW_USER = (
    "[User Question]\n{question}\n[End of User Question]\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]\n\n"
    "[The Start of Evaluation Plan]\n{instruction}\n[The End of Evaluation Plan]"
)


@dataclasses.dataclass(frozen=True)
class RolePrompt:
    """One agent's system prompt and user template."""

    system: str
    user_template: str

    def __post_init__(self):
        fields = {f for _, f, _, _ in string.Formatter().parse(self.user_template) if f is not None}
        unknown = fields - {"question", "answer_a", "answer_b", "instruction"}
        if unknown:
            raise ValueError(f"user template has unknown fields {sorted(unknown)}: {self.user_template!r}")

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(f for _, f, _, _ in string.Formatter().parse(self.user_template) if f is not None)

    def user(self, question: Mapping[str, str], instruction: str | None = None) -> str:
        """The first user message: the template filled with the question fields (and instruction)."""
        values = dict(question)
        if "instruction" in self.fields:
            if instruction is None:
                raise ValueError("this user template needs the meta-thinking agent's instruction")
            values["instruction"] = instruction
        missing = self.fields - set(values)
        if missing:
            raise ValueError(
                f"question is missing fields {sorted(missing)} needed by the user template "
                f"{self.user_template!r}; got fields {sorted(values)}"
            )
        return self.user_template.format(**values)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The prompts of one rollout mode: one ``RolePrompt`` per role that speaks.

    ``finish_flag`` is the stop string of the multi-turn protocol (None: no stop string).
    """

    roles: Mapping[str, RolePrompt]
    finish_flag: str | None = None

    def __getitem__(self, role: str) -> RolePrompt:
        if role not in self.roles:
            raise KeyError(f"no prompt for role {role!r}; this prompt set has {sorted(self.roles)}")
        return self.roles[role]


def _mamrp(mta: RolePrompt, ra: RolePrompt, finish_flag: str | None = None) -> PromptSet:
    return PromptSet({META_THINKING: mta, REASONING: ra}, finish_flag)


_MATH_PROMPTS: dict[tuple[str, str], PromptSet] = {
    ("vrp", "paper"): PromptSet({SINGLE: RolePrompt(PAPER_VRP_SYSTEM, PAPER_VRP_USER)}),
    ("vrp", "code"): PromptSet({SINGLE: RolePrompt(CODE_VRP_SYSTEM, CODE_VRP_USER)}),
    # MRP has no code version: both variants use the paper's text.
    ("mrp", "paper"): PromptSet({SINGLE: RolePrompt(PAPER_MRP_SYSTEM, PAPER_MRP_USER)}),
    ("mrp", "code"): PromptSet({SINGLE: RolePrompt(PAPER_MRP_SYSTEM, PAPER_MRP_USER)}),
    ("single_turn", "paper"): _mamrp(
        RolePrompt(PAPER_MAMRP_HIGH_SYSTEM, PAPER_MAMRP_HIGH_USER),
        RolePrompt(PAPER_MAMRP_LOW_SYSTEM, PAPER_MAMRP_LOW_USER),
    ),
    ("single_turn", "code"): _mamrp(
        RolePrompt(CODE_ST_MTA_SYSTEM, CODE_MTA_USER), RolePrompt(CODE_ST_RA_SYSTEM, CODE_RA_USER)
    ),
    ("multi_turn", "paper"): _mamrp(
        RolePrompt(CODE_MT_MTA_SYSTEM, CODE_MTA_USER), RolePrompt(CODE_MT_RA_SYSTEM, CODE_RA_USER), FINISH_FLAG
    ),
    ("multi_turn", "code"): _mamrp(
        RolePrompt(CODE_MT_MTA_SYSTEM, CODE_MTA_USER), RolePrompt(CODE_MT_RA_SYSTEM, CODE_RA_USER), FINISH_FLAG
    ),
}

_JUDGE_PROMPTS: dict[tuple[str, str], PromptSet] = {
    ("single_turn", "paper"): _mamrp(
        RolePrompt(PAPER_JUDGE_HIGH_SYSTEM, PAPER_JUDGE_HIGH_USER),
        RolePrompt(PAPER_JUDGE_LOW_SYSTEM, PAPER_JUDGE_LOW_USER),
    ),
}

DEFAULT_VARIANT: dict[str, Variant] = {"vrp": "paper", "mrp": "paper", "single_turn": "paper", "multi_turn": "code"}


def get_prompts(mode: Mode, variant: Variant | None = None, task: TaskKind = "math") -> PromptSet:
    """The prompt set of a rollout mode; ``variant=None`` picks the mode's default."""
    if mode not in DEFAULT_VARIANT:
        raise ValueError(f"unknown rollout mode {mode!r}; expected one of {sorted(DEFAULT_VARIANT)}")
    variant = DEFAULT_VARIANT[mode] if variant is None else variant
    if variant not in ("paper", "code"):
        raise ValueError(f"prompt variant must be 'paper' or 'code', got {variant!r}")
    table = {"math": _MATH_PROMPTS, "judge": _JUDGE_PROMPTS}.get(task)
    if table is None:
        raise ValueError(f"task must be 'math' or 'judge', got {task!r}")
    if (mode, variant) not in table:
        raise ValueError(f"no {task} prompts for mode={mode!r} variant={variant!r}; available: {sorted(table)}")
    return table[(mode, variant)]


def judge_fields(question: str, response_a: str, response_b: str) -> dict[str, str]:
    """Question fields for the judge prompts (pass the result as the rollout's question)."""
    return {"question": question, "answer_a": response_a, "answer_b": response_b}
