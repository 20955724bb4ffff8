"""``python -m atedm doctor``: the tiny dry run prints one table and writes the same CSV, a broken kernel
fails its check and the exit status, and the near-tie rule that defines "kept sets exact" both admits a
swap inside its band and rejects one outside it."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atedm.cli import build_parser
from atedm.doctor import run_doctor
from atedm_kernels import attention_lse, selfcheck, topk_gather, topk_keep_indices_ref
from atedm_kernels.selfcheck import keep_list_problem, kept_set_swaps, recovery_differences

ROOT = Path(__file__).resolve().parent.parent
CHECK_ITEMS = {"topk_keep_indices", "attention_with_lse", "head_mean_attention_map", "gwpr_scores", "recovery_source",
               "gather_tokens", "scatter_recover", "chain"}
FP16 = selfcheck.TOLERANCES[torch.float16]
PLAN = dict(prune_ratio=0.645, iterations=3)


@pytest.fixture
def one_thread():
    """Tiny matmuls on a busy 2-core machine: a second OpenMP thread made them up to 100x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def printed_rows(stdout: str) -> list[list[str]]:
    """The cells of every table row in the doctor's output (header and rule lines left out)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_tiny_dry_run_prints_one_table_and_appends_the_same_rows_to_the_csv(tmp_path):
    out = tmp_path / "doctor.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "atedm", "doctor", "--tiny", "--repeats", "1", "--csv", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TRITON_INTERPRET=1" in done.stdout and "dtypes float32; 128 px" in done.stdout
    saved = list(csv.DictReader(out.open()))
    assert [[row[name] for name in ("section", "item", "dtype", "shape", "result")] for row in saved] == \
        [cells[:5] for cells in printed_rows(done.stdout)]
    assert all(row["result"] == "ok" for row in saved)
    assert {row["item"] for row in saved if row["section"] == "checks"} == CHECK_ITEMS
    assert len([row for row in saved if row["section"] == "checks"]) == 2 * len(CHECK_ITEMS)  # levels 2 and 3
    # Timed on the CPU's production path, as the integration runs: its pruning layer is the one-pass
    # attention_with_map where the plan builds a map, else attention_with_lse.
    assert "block and step time auto: CPU production path" in done.stdout
    block_items = [row["item"] for row in saved if row["section"] == "block"]
    assert [item.replace("_with_map", "").replace("_with_lse", "") for item in block_items] == 2 * [
        "sdpa", "attention", "plan_token_pruning", "recovery_source", "gather_tokens", "scatter_recover", "overhead"]
    steps = {row["item"]: row for row in saved if row["section"] == "step"}
    assert set(steps) == {"build", "full", "preset c (late)"}
    assert float(steps["full"]["ms"]) > 0 and "eta" in steps["preset c (late)"]["note"]
    assert saved[0]["torch"] == torch.__version__ and saved[0]["triton_interpret"] == "1" and saved[0]["git_sha"]


def test_tiny_step_runs_from_an_installed_package_without_the_tests(tmp_path):
    """--tiny builds the package's own tiny UNet: an installed atedm has no tests/ folder beside it."""
    for package in ("atedm", "atedm_kernels"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "atedm", "doctor", "--tiny", "--sections", "step", "--repeats", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny SDXL-shaped UNet, random weights" in done.stdout


def test_a_wrong_top_k_fails_its_check_the_chain_and_the_exit_status(monkeypatch, tmp_path, one_thread):
    keep_the_best = topk_gather._topk_keep_indices_into

    def keep_the_worst(keep, scores, k):
        return keep_the_best(keep, -scores, k)

    monkeypatch.setattr(topk_gather, "_topk_keep_indices_into", keep_the_worst)
    out = tmp_path / "doctor.csv"
    args = build_parser().parse_args(["doctor", "--tiny", "--sections", "checks", "--csv", str(out)])
    assert run_doctor(args) == 1
    results = [(row["item"], row["result"]) for row in csv.DictReader(out.open())]
    assert {item for item, result in results if result.startswith("FAIL")} == {"topk_keep_indices", "chain"}
    assert all(result == "ok" for item, result in results if item not in ("topk_keep_indices", "chain"))


def _level3_results() -> dict:
    shapes = selfcheck.sdxl_block_shapes(128, tiny=True)[1:]
    rows = selfcheck.check_rows(shapes, [torch.float32], "cpu", "triton", seed=0, **PLAN)
    return {row["item"]: row["result"] for row in rows}


def test_an_attention_output_off_by_a_tenth_of_a_percent_fails_its_check(monkeypatch, one_thread):
    exact = attention_lse._attention_with_lse_launch

    def slightly_off(*args, **kwargs):
        out, lse = exact(*args, **kwargs)
        return out.mul_(1.001), lse

    monkeypatch.setattr(attention_lse, "_attention_with_lse_launch", slightly_off)
    results = _level3_results()
    assert results.pop("attention_with_lse").startswith("FAIL: error")
    assert set(results.values()) == {"ok"}  # the plan reads lse only: the chain stays exact


def test_a_row_copy_that_leaves_the_last_row_unwritten_fails_on_the_poison(monkeypatch, one_thread):
    full_copy = topk_gather._gather_rows_into

    def all_but_the_last_row(out, rows, index):
        full_copy(out[:, :-1], rows, index[:, :-1])
        return out

    monkeypatch.setattr(topk_gather, "_gather_rows_into", all_but_the_last_row)
    results = _level3_results()
    assert results["gather_tokens"].startswith("FAIL") and results["scatter_recover"].startswith("FAIL")
    assert results["chain"] == "ok"


# --- the near-tie rule ---------------------------------------------------------------------------------

N = 8
# One image; with k = 3 the reference keeps tokens 0, 4 and 1, and t_k = 0.5 / N. Token 3 sits 0.1%
# below t_k, inside the fp16 band (2e-3 / N + 2e-3 * t_k = 3e-3 / N); token 6 is 40% below it.
SCORES = torch.tensor([[0.9, 0.5, 0.2, 0.4995, 0.7, 0.1, 0.3, 0.05]]) / N
REF_KEEP = torch.tensor([[0, 1, 4]])


def test_reference_keep_of_the_constructed_scores():
    assert torch.equal(topk_keep_indices_ref(SCORES, 3), REF_KEEP)


@pytest.mark.parametrize("kernel_keep, expected", [
    ([0, 1, 4], (0, 0)),  # the same set
    ([0, 3, 4], (2, 0)),  # t_k's token swapped for its near-tie: both tokens inside the band
    ([0, 4, 6], (1, 1)),  # swapped for a token 40% below t_k: that one lies outside the band
])
def test_kept_set_swaps_admit_only_near_ties(kernel_keep, expected):
    assert kept_set_swaps(torch.tensor([kernel_keep]), REF_KEEP, SCORES, FP16) == expected


def test_the_band_scales_with_the_dtype_tolerance():
    wider = dict(atol=0.5, rtol=0.0)  # band 0.5 / N: token 6 (0.2 / N below t_k) becomes a near tie
    assert kept_set_swaps(torch.tensor([[0, 4, 6]]), REF_KEEP, SCORES, wider) == (2, 0)


# Four tokens, tokens 0 and 1 kept. Token 2's similarity to token 1 is 0.1% below its best (token 0),
# within the margin 2e-3 / 4 + 2e-3 * 0.5; token 3's is a third of its best.
SIMILARITY = torch.tensor([[[0.7, 0.1, 0.1, 0.1],
                            [0.1, 0.7, 0.1, 0.1],
                            [0.5, 0.4995, 0.0005, 0.0],
                            [0.6, 0.2, 0.1, 0.1]]])
KEEP = torch.tensor([[0, 1]])
REF_SRC = torch.tensor([[0, 1, 0, 0]])


@pytest.mark.parametrize("kernel_src, expected", [
    ([0, 1, 0, 0], (0, 0)),
    ([0, 1, 1, 0], (1, 0)),  # token 2 picks its near-best kept token
    ([0, 1, 0, 1], (0, 1)),  # token 3 picks a kept token far below its best
    ([1, 1, 0, 0], (0, 1)),  # a kept token must take its own slot, whatever the similarities
    ([0, 1, 2, 0], (0, 4)),  # a slot outside the kept list fails every source
])
def test_recovery_sources_differ_only_within_the_similarity_margin(kernel_src, expected):
    assert recovery_differences(torch.tensor([kernel_src]), REF_SRC, KEEP, SIMILARITY, FP16) == expected


@pytest.mark.parametrize("keep, problem", [
    ([[0, 1, 4]], None),
    ([[-1, 1, 4]], "outside"),  # a slot the kernel never wrote keeps its -1 poison
    ([[0, 4, 1]], "ascending"),
    ([[0, 1, 1]], "ascending"),
    ([[0, 1]], "shape"),
])
def test_kept_lists_must_be_distinct_ascending_and_in_range(keep, problem):
    found = keep_list_problem(torch.tensor(keep), N, 3)
    assert found is None if problem is None else problem in found
