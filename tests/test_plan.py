"""`refine plan`: the scaling laws against hand computation, their limits, compute accounting, the CLI."""

import pytest
from typer.testing import CliRunner

from refine.cli import app
from refine.plan import (Candidate, best_plan, best_teacher_loss, compute, distilled_loss, parse_count,
                         supervised_loss)


def test_supervised_law_by_hand():
    # E + (A / N^alpha + B / D^beta)^gamma with Table 6's supervised column
    by_hand = 1.220 + (3355 / 1e8**0.408 + 18186 / 1e10**0.431) ** 0.452
    assert supervised_loss(1e8, 1e10) == pytest.approx(by_hand, rel=1e-12)
    assert supervised_loss(1e8, 1e10) == pytest.approx(2.7913, abs=1e-4)


def test_distillation_law_by_hand():
    n, d, lt = 2e8, 1e10, 2.3
    ls_tilde = 1.220 + (3355 / n**0.408 + 18186 / d**0.431) ** 0.452
    by_hand = lt + lt**-2.549 * (1 + (lt / (ls_tilde * 1.315)) ** (1 / 0.090)) ** (-522.6 * 0.090) \
        * (2243 / n**0.321 + 24181 / d**0.637) ** 0.764
    assert distilled_loss(lt, n, d) == pytest.approx(by_hand, rel=1e-12)


def test_limits_the_paper_states():
    # supervised: unlimited parameters and data reach the irreducible loss E
    assert supervised_loss(1e30, 1e30) == pytest.approx(1.220, abs=1e-3)
    # a weak teacher (L_T far above what the student reaches alone): the student ends at the teacher's loss
    assert distilled_loss(4.0, 2e8, 1e10) == pytest.approx(4.0, abs=1e-6)
    # a student with unlimited capacity and data matches its teacher
    assert distilled_loss(2.0, 1e30, 1e30) == pytest.approx(2.0, abs=1e-3)
    # the student never beats its teacher
    assert all(distilled_loss(lt, 2e8, 1e10) >= lt for lt in (1.5, 2.0, 2.5, 3.0))


def test_capacity_gap_is_a_u_with_an_interior_minimum():
    best = best_teacher_loss(2e8, 1e10)
    assert 1.5 < best < 2.6
    at_best = distilled_loss(best, 2e8, 1e10)
    assert distilled_loss(best - 0.4, 2e8, 1e10) > at_best < distilled_loss(best + 0.4, 2e8, 1e10)
    # a bigger student can use a stronger teacher
    assert best_teacher_loss(2e9, 1e10) < best


def test_compute_accounting_per_scenario():
    n_s, d_s, n_t, d_t = 2e8, 1e10, 1.8e9, 1e12
    assert compute(n_s, d_s, n_t, d_t, "best-case") == 6 * n_s * d_s
    assert compute(n_s, d_s, n_t, d_t, "teacher-inference") == 6 * n_s * d_s + 2 * n_t * d_s
    assert compute(n_s, d_s, n_t, d_t, "teacher-pretraining") == 6 * n_s * d_s + 6 * n_t * d_t
    assert compute(n_s, d_s, n_t, d_t, "teacher-pretraining-and-inference") == 6 * n_s * d_s + 2 * n_t * d_s + 6 * n_t * d_t


def test_best_plan_spends_the_budget_and_ranks_candidates():
    budget = 1e21
    rows = best_plan(2e8, budget, [Candidate(1.8e9, 2.3), Candidate(7e9)], "teacher-pretraining-and-inference")
    assert rows == sorted(rows, key=lambda r: r["student_loss"])
    existing = next(r for r in rows if r["teacher"].startswith("1.8B"))
    assert compute(2e8, existing["tokens"], 1.8e9, scenario="teacher-inference") == pytest.approx(budget)
    trained = next(r for r in rows if "trained on" in r["teacher"])
    assert trained["tokens"] > 0 and trained["student_loss"] > 1.22


def test_parse_count():
    assert parse_count("200M") == 2e8 and parse_count("1.8B") == 1.8e9 and parse_count("1e21") == 1e21
    with pytest.raises(ValueError):
        parse_count("lots")


def test_cli_prints_both_losses_and_draws_the_u(tmp_path, tiny_run):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--student-params", "200M", "--tokens", "10B", "--teacher-loss", "2.3",
                                 "--teacher-params", "1.8B", "--plot", str(tmp_path / "u.png")])
    assert result.exit_code == 0, result.output
    assert "without a teacher: loss 2.6678" in result.output and "distilled from a teacher of loss 2.3000" in result.output
    assert "planning estimate" in result.output.lower() and "Capacity gap" in result.output
    assert (tmp_path / "u.png").stat().st_size > 10_000
    measured = runner.invoke(app, ["plan", "--student-params", "10M", "--tokens", "1B", "--from-scores",
                                   str(tiny_run / "scores")])
    assert measured.exit_code == 0, measured.output
    assert "measured over" in measured.output
    bad = runner.invoke(app, ["plan", "--student-params", "200M"])
    assert bad.exit_code == 2 and "--tokens" in bad.output


@pytest.mark.parametrize("args, fragment", [
    (["--tokens", "10B", "--teacher-loss", "1.2"], "at or below the law's irreducible loss E = 1.220"),
    (["--tokens", "10B", "--teacher-loss", "0"], "--teacher-loss 0.0 must be positive"),
    (["--tokens", "10B", "--teacher-loss", "nan"], "is not a finite number"),
    (["--tokens", "10B", "--teacher-loss", "inf"], "is not a finite number"),
    (["--tokens", "10B", "--teacher-loss", "40"], "above 15 nats/token"),
    (["--tokens", "1e20", "--teacher-loss", "2.3"], "--tokens 1e20 is outside the range the scaling law covers"),
    (["--tokens", "10B", "--teacher-loss", "2.3", "--teacher-params", "5T"], "--teacher-params 5T is outside"),
    (["--tokens", "-3B"], "must be a positive, finite number"),
    (["--tokens", "nanB"], "must be a positive, finite number"),
    (["--compute", "1e12", "--candidate", "1B:2.3"], "--compute 1e12 (the student alone would train on"),
    (["--compute", "1e21", "--candidate", "1B:1.0"], "--candidate '1B:1.0': teacher loss 1.0 is at or below"),
    (["--compute", "1e21", "--candidate", "1B:x"], "'x' is not a loss"),
])
def test_plan_refuses_what_the_law_cannot_answer(args, fragment):
    result = CliRunner().invoke(app, ["plan", "--student-params", "200M", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_plan_refuses_a_tiny_student_and_reports_every_problem():
    result = CliRunner().invoke(app, ["plan", "--student-params", "1000", "--tokens", "1e3", "--teacher-loss", "1.0"])
    assert result.exit_code == 2
    assert "--student-params 1000 is outside" in result.stderr and "--tokens 1e3 is outside" in result.stderr
    assert "irreducible loss" in result.stderr and result.stderr.count("\n") == 1
