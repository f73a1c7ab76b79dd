"""`refine plan`: the distillation scaling law of Busbridge et al. (2025) as a planning tool.

Supervised law (their Eq. 1):   L(N, D) = E + (A / N^a + B / D^b)^g
Distillation law (their Eq. 8): L_S = L_T + L_T^(-c0) * (1 + (L_T / (L~_S * d1))^(1/f1))^(-c1 * f1)
                                      * (A' / N_S^a' + B' / D_S^b')^g'
with L~_S = L(N_S, D_S), the loss the same student would reach without a teacher. N counts
non-embedding parameters, D tokens, losses are cross-entropies in nats on their data (C4, English,
their architecture and tokenizer): the figures are planning estimates, not promises for another corpus.

Coefficients: Table 6 (Appendix F.3). The copy of the paper in this repository's sources lost the
table's row labels; the mapping below follows the row order (A, B, E, alpha, beta, gamma, then c0, c1,
f1, d1 for the distillation-only rows) and reproduces the paper's stated limits (tested), but the
labels themselves could not be checked against the printed table.

Compute (their Eq. 9 and Table 2): student training 6 N_S D_S; teacher logits 2 N_T D_S; teacher
training 6 N_T D_T where the scenario counts it.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass

import numpy as np

SUPERVISED = {"E": 1.220, "A": 3355.0, "B": 18186.0, "alpha": 0.408, "beta": 0.431, "gamma": 0.452}
DISTILLATION = {"A": 2243.0, "B": 24181.0, "alpha": 0.321, "beta": 0.637, "gamma": 0.764,
                "c0": 2.549, "c1": 522.6, "f1": 0.090, "d1": 1.315}
# Table 2: which costs a scenario pays besides the student's own training.
SCENARIOS = {
    "best-case": (False, False),  # teacher exists and its logits are free (e.g. cached for other uses)
    "teacher-inference": (True, False),  # teacher exists; its forward passes over D_S are paid
    "teacher-pretraining": (False, True),  # teacher trained for this student; logits free
    "teacher-pretraining-and-inference": (True, True),
}
CAPACITY_GAP_GUIDANCE = (
    "Capacity gap: a stronger teacher is not always better. Past a point a more capable teacher (lower loss, "
    "bigger, or trained longer) gives a worse student, because the student cannot represent what the teacher "
    "learned (the 'curse' of the capacity gap); the best teacher grows with the student. If the law puts your "
    "teacher past the minimum of the U, use a weaker or smaller teacher, or distil through an intermediate-size "
    "teacher assistant (MiniDisc/MiniMA), rather than the largest model you have."
)


def supervised_loss(n_params: float, tokens: float) -> float:
    """L(N, D): cross-entropy of a model of N non-embedding parameters trained on D tokens without a teacher."""
    c = SUPERVISED
    return c["E"] + (c["A"] / n_params ** c["alpha"] + c["B"] / tokens ** c["beta"]) ** c["gamma"]


def distilled_loss(teacher_loss: float, n_params: float, tokens: float) -> float:
    """L_S(L_T, N_S, D_S): cross-entropy of a student distilled on D_S tokens from a teacher of loss L_T."""
    c = DISTILLATION
    student_alone = supervised_loss(n_params, tokens)
    transition = (1 + (teacher_loss / (student_alone * c["d1"])) ** (1 / c["f1"])) ** (-c["c1"] * c["f1"])
    capacity = (c["A"] / n_params ** c["alpha"] + c["B"] / tokens ** c["beta"]) ** c["gamma"]
    return teacher_loss + teacher_loss ** (-c["c0"]) * transition * capacity


def compute(student_params: float, tokens: float, teacher_params: float = 0.0, teacher_tokens: float = 0.0,
            scenario: str = "teacher-inference") -> float:
    """FLOPs of the plan: 6 N_S D_S, plus 2 N_T D_S and/or 6 N_T D_T as the scenario counts them."""
    inference, pretraining = SCENARIOS[scenario]
    total = 6 * student_params * tokens
    if inference:
        total += 2 * teacher_params * tokens
    if pretraining:
        total += 6 * teacher_params * teacher_tokens
    return total


def best_teacher_loss(n_params: float, tokens: float) -> float:
    """The teacher loss that minimises the student's (bottom of the capacity-gap U), by bounded search."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda lt: distilled_loss(lt, n_params, tokens), bounds=(0.5, 10.0), method="bounded")
    return float(result.x)


@dataclass
class Candidate:
    """A teacher to choose from: its size and, if it exists, its loss (else trained: loss from the supervised law)."""

    params: float
    loss: float | None = None


def best_plan(student_params: float, budget: float, candidates: list[Candidate], scenario: str) -> list[dict]:
    """For each candidate teacher, the split of `budget` that minimises the student's loss (SLSQP, as the paper).

    An existing teacher (loss given): all of the budget not spent on its logits goes to distillation tokens.
    A teacher to be trained: the budget is split between its tokens D_T and the student's D_S.
    Returns one row per candidate plus the supervised baseline, best first.
    """
    from scipy.optimize import minimize

    inference, pretraining = SCENARIOS[scenario]
    per_token = 6 * student_params
    rows = [{"teacher": "none (supervised)", "tokens": budget / per_token,
             "student_loss": supervised_loss(student_params, budget / per_token)}]
    for candidate in candidates:
        token_cost = per_token + (2 * candidate.params if inference else 0.0)
        if candidate.loss is not None or not pretraining:
            if candidate.loss is None:
                raise ValueError("a teacher that is not trained within the budget needs its loss")
            tokens = budget / token_cost
            rows.append({"teacher": f"{_fmt(candidate.params)} (loss {candidate.loss:.3f})", "tokens": tokens,
                         "student_loss": distilled_loss(candidate.loss, student_params, tokens)})
            continue

        # x = log10 of (D_S, D_T); the budget constraint 6 N_S D_S (+ 2 N_T D_S) + 6 N_T D_T <= C
        def objective(x):
            d_s, d_t = 10 ** x
            return distilled_loss(supervised_loss(candidate.params, d_t), student_params, d_s)

        def slack(x):
            d_s, d_t = 10 ** x
            return 1 - (token_cost * d_s + 6 * candidate.params * d_t) / budget

        start = np.log10([budget / (2 * token_cost), budget / (12 * candidate.params)])
        result = minimize(objective, start, method="SLSQP", constraints=[{"type": "ineq", "fun": slack}],
                          bounds=[(6, 16), (6, 16)])
        d_s, d_t = 10 ** result.x
        teacher_loss = supervised_loss(candidate.params, d_t)
        rows.append({"teacher": f"{_fmt(candidate.params)} trained on {_fmt(d_t)} tokens (loss {teacher_loss:.3f})",
                     "tokens": float(d_s), "student_loss": float(result.fun)})
    return sorted(rows, key=lambda r: r["student_loss"])


def _fmt(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def parse_count(text: str) -> float:
    """'200M', '1.8B', '10B', '1e21', '3T' -> a float."""
    text = text.strip()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:].upper())
    try:
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a count; write e.g. 200M, 1.8B, 10B or 1e21") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} must be a positive, finite number; write e.g. 200M, 1.8B, 10B or 1e21")
    return value


def teacher_loss_from_scores(scores_dir: str) -> tuple[float, int]:
    """(teacher NLL per token, tokens) measured by `refine score` over a corpus."""
    import pyarrow.dataset as pads

    table = pads.dataset(f"{scores_dir}/data", format="parquet").to_table(columns=["teacher_logprob", "n_tokens"])
    tokens = int(np.sum(table.column("n_tokens").to_numpy()))
    return float(-np.sum(table.column("teacher_logprob").to_numpy()) / tokens), tokens


def plot_capacity_gap(n_params: float, tokens: float, path: str, teacher_loss: float | None = None) -> None:
    """Student loss vs teacher loss at fixed N_S, D_S: the capacity-gap U, with the supervised level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.linspace(1.3, 5.0, 400)
    student = [distilled_loss(lt, n_params, tokens) for lt in losses]
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    axis.plot(losses, student, label=f"distilled student ({_fmt(n_params)} params, {_fmt(tokens)} tokens)")
    axis.axhline(supervised_loss(n_params, tokens), color="gray", linestyle="--", label="same student, no teacher")
    axis.plot(losses, losses, color="lightgray", linewidth=1, label="student = teacher")
    best = best_teacher_loss(n_params, tokens)
    axis.axvline(best, color="green", linewidth=1, label=f"best teacher loss {best:.2f}")
    if teacher_loss is not None:
        axis.axvline(teacher_loss, color="red", linewidth=1, label=f"your teacher {teacher_loss:.2f}")
    axis.set_xlabel("teacher cross-entropy L_T (nats/token)")
    axis.set_ylabel("predicted student cross-entropy")
    axis.set_title("Distillation scaling law (Busbridge et al. 2025, C4 fit)")
    axis.set_ylim(min(student) - 0.2, min(student) + 2.5)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# What the law can answer. Busbridge et al. fit students of about 1e8 to 1e10 non-embedding parameters on
# about 1e9 to 1e12 tokens; we allow a hundred times more on either side (params 1e6..1e12, tokens 1e8..1e14)
# before refusing, since a planning estimate a little outside the fit is still useful and far outside it is
# not. A teacher loss must lie above the law's irreducible loss E (no model reaches it; at or below it the law
# has no meaning) and at most 15 nats/token (a uniform guess over 3 million tokens: no trained LM is worse).
PARAMS_RANGE = (1e6, 1e12)
TOKENS_RANGE = (1e8, 1e14)
MAX_TEACHER_LOSS = 15.0


def _out_of_range(what: str, value: float, bounds: tuple[float, float], fix: str) -> str | None:
    low, high = bounds
    if low <= value <= high:
        return None
    return (f"{what} is outside the range the scaling law covers ({_fmt(low)} to {_fmt(high)}, a hundred "
            f"times past the paper's fit); {fix}")


def _teacher_loss_problem(what: str, loss: float) -> str | None:
    if not math.isfinite(loss) or loss <= SUPERVISED["E"]:
        return (f"{what} {loss} is at or below the law's irreducible loss E = {SUPERVISED['E']:.3f} nats/token, which no "
                f"model reaches; give the teacher's measured cross-entropy in nats per token (above {SUPERVISED['E']:.3f})")
    if loss > MAX_TEACHER_LOSS:
        return (f"{what} {loss} is above {MAX_TEACHER_LOSS:g} nats/token, worse than any trained LM; give the teacher's "
                "cross-entropy in nats per token (not bits, not perplexity)")
    return None


@dataclass
class PlanInputs:
    """`refine plan`'s options as numbers, checked against what the law can answer."""

    n_student: float
    tokens: float | None
    n_teacher: float
    teacher_tokens: float
    budget: float | None
    candidates: list
    teacher_loss: float | None
    notes: list  # lines to print before the estimate (e.g. the measured teacher loss)


def plan(cfg) -> list[str]:
    """The lines `refine plan` prints (see PlanConfig for the options)."""
    inputs = read_inputs(cfg)
    lines = [*inputs.notes, "Planning estimate from the distillation scaling law of Busbridge et al. (2025), fitted on C4 "
             "with their architecture and tokenizer; losses on your corpus and tokenizer will differ."]
    if inputs.tokens is not None:
        lines += token_lines(inputs, cfg.scenario)
    rows = budget_rows(inputs, cfg.scenario) if inputs.budget is not None else None
    if rows is not None:
        lines.append(f"budget {inputs.budget:.3e} FLOPs, student {_fmt(inputs.n_student)} params, scenario {cfg.scenario}:")
        for row in rows:
            lines.append(f"  {row['teacher']:<45} student tokens {_fmt(row['tokens']):>7}  predicted loss {row['student_loss']:.4f}")
        lines.append(f"  best: {rows[0]['teacher']}")
    lines.append(CAPACITY_GAP_GUIDANCE)
    if cfg.plot:
        plot_capacity_gap(inputs.n_student, inputs.tokens or rows[0]["tokens"], cfg.plot, inputs.teacher_loss)
        lines.append(f"wrote {cfg.plot}")
    return lines


def read_inputs(cfg) -> PlanInputs:
    """Parse and check every option; raise one RefineError naming every problem."""
    from refine.errors import RefineError

    problems: list[str] = []

    def count(flag: str, text: str | None, bounds: tuple[float, float] | None, fix: str, default=None):
        if not text:
            return default
        try:
            value = parse_count(text)
        except ValueError as e:
            problems.append(f"{flag}: {e}")
            return default
        if bounds is not None:
            problems.append(_out_of_range(f"{flag} {text}", value, bounds, fix))
        return value

    n_student = count("--student-params", cfg.student_params, PARAMS_RANGE, "give the student's non-embedding parameters, e.g. 200M")
    tokens = count("--tokens", cfg.tokens, TOKENS_RANGE, "give the student's training tokens, e.g. 10B")
    n_teacher = count("--teacher-params", cfg.teacher_params, PARAMS_RANGE, "give the teacher's parameters, e.g. 1.8B", 0.0)
    teacher_tokens = count("--teacher-tokens", cfg.teacher_tokens, TOKENS_RANGE, "give the teacher's training tokens, e.g. 3T", 0.0)
    budget = count("--compute", cfg.compute, None, "")
    candidates = []
    for text in cfg.candidate or []:
        try:
            candidate = _candidate(text)
        except ValueError as e:
            problems.append(f"--candidate {text!r}: {e}")
            continue
        problems.append(_out_of_range(f"--candidate {text!r}: teacher size {text.partition(':')[0]}", candidate.params, PARAMS_RANGE,
                                      "give PARAMS[:LOSS], e.g. 1.8B:2.3"))
        if candidate.loss is not None:
            problems.append(_teacher_loss_problem(f"--candidate {text!r}: teacher loss", candidate.loss))
        candidates.append(candidate)
    if cfg.scenario not in SCENARIOS:
        problems.append(f"--scenario {cfg.scenario!r} is not one of {', '.join(SCENARIOS)}; choose one of them")
    teacher_loss, notes = cfg.teacher_loss, []
    if cfg.from_scores:
        if not (Path(cfg.from_scores) / "data").is_dir():
            problems.append(f"{cfg.from_scores!r} is not a `refine score` output (no data/ folder); give a scores directory")
        else:
            teacher_loss, measured = teacher_loss_from_scores(cfg.from_scores)
            notes.append(f"teacher loss L_T = {teacher_loss:.4f} nats/token, measured over {measured:,} tokens in {cfg.from_scores}")
    if teacher_loss is not None:
        problems.append(_teacher_loss_problem("--from-scores: the measured teacher loss" if cfg.from_scores else "--teacher-loss",
                                              teacher_loss))
    if tokens is None and budget is None and not cfg.tokens and not cfg.compute:
        problems.append("give --tokens (the student's training tokens) or --compute (a FLOP budget)")
    if budget is not None and n_student is not None and _out_of_range("", n_student, PARAMS_RANGE, "") is None:
        alone_tokens = budget / (6 * n_student)
        problems.append(_out_of_range(f"--compute {cfg.compute} (the student alone would train on {_fmt(alone_tokens)} tokens)",
                                      alone_tokens, TOKENS_RANGE,
                                      "give a budget of 6 x student params x tokens FLOPs, e.g. 1.2e22 for 200M params on 10B tokens"))
    if cfg.plot and not Path(cfg.plot).expanduser().parent.is_dir():
        problems.append(f"--plot {cfg.plot!r}: folder {str(Path(cfg.plot).expanduser().parent)!r} does not exist; "
                        "create it or give another path")
    if budget is not None and not candidates and teacher_loss is None and not n_teacher:
        problems.append("--compute needs teachers to compare: --candidate PARAMS[:LOSS] or --teacher-params/--teacher-loss")
    problems = [p for p in problems if p]
    if problems:
        raise RefineError(*problems)
    return PlanInputs(n_student, tokens, n_teacher, teacher_tokens, budget, candidates, teacher_loss, notes)


def token_lines(inputs: PlanInputs, scenario: str) -> list[str]:
    """The student at --tokens: alone, distilled, the same compute spent alone, and the best teacher loss."""
    n_student, tokens, teacher_loss, n_teacher = inputs.n_student, inputs.tokens, inputs.teacher_loss, inputs.n_teacher
    alone = supervised_loss(n_student, tokens)
    lines = [f"student {_fmt(n_student)} params, {_fmt(tokens)} tokens:",
             f"  without a teacher: loss {alone:.4f}, compute {compute(n_student, tokens, scenario='best-case'):.3e} FLOPs"]
    if teacher_loss is None:
        return lines
    distilled = distilled_loss(teacher_loss, n_student, tokens)
    cost = compute(n_student, tokens, n_teacher, inputs.teacher_tokens, scenario=scenario)
    notes = [f"teacher {_fmt(n_teacher)} params" if n_teacher else "teacher size not given: its costs not counted"]
    if SCENARIOS[scenario][1] and n_teacher and not inputs.teacher_tokens:
        notes.append("teacher training not counted: give --teacher-tokens")
    lines.append(f"  distilled from a teacher of loss {teacher_loss:.4f} ({'; '.join(notes)}): loss {distilled:.4f}, "
                 f"compute {cost:.3e} FLOPs ({scenario})")
    better = "distillation" if distilled < alone else "training without a teacher"
    lines.append(f"  at these tokens {better} is better by {abs(alone - distilled):.4f} nats/token")
    if n_teacher:
        same_compute_tokens = cost / (6 * n_student)
        lines.append(f"  the distillation's compute would train the student alone on {_fmt(same_compute_tokens)} "
                     f"tokens: loss {supervised_loss(n_student, same_compute_tokens):.4f}")
    best = best_teacher_loss(n_student, tokens)
    lines.append(f"  best teacher loss for this student and token count: {best:.3f} (student loss "
                 f"{distilled_loss(best, n_student, tokens):.4f})"
                 + ("; your teacher is past the capacity-gap minimum" if teacher_loss < best else ""))
    return lines


def budget_rows(inputs: PlanInputs, scenario: str) -> list[dict]:
    """The best plan for each candidate teacher at --compute (the given teacher when no candidate is named)."""
    from refine.errors import RefineError

    candidates = inputs.candidates or [Candidate(inputs.n_teacher or 0.0, inputs.teacher_loss)]
    try:
        return best_plan(inputs.n_student, inputs.budget, candidates, scenario)
    except ValueError as e:
        raise RefineError(f"{e}; give PARAMS:LOSS for it, or the scenario teacher-pretraining") from None


def _candidate(text: str) -> Candidate:
    params, _, loss = text.partition(":")
    try:
        teacher_loss = float(loss) if loss else None
    except ValueError:
        raise ValueError(f"{loss!r} is not a loss; write PARAMS:LOSS, e.g. 1.8B:2.3") from None
    return Candidate(parse_count(params), teacher_loss)
